from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("django_idempotency", "0002_steps_and_outbox"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="idempotencykey",
            options={
                "permissions": (
                    ("view_decrypted_response", "Can view decrypted stored responses"),
                ),
                "verbose_name": "idempotency key",
                "verbose_name_plural": "idempotency keys",
            },
        ),
    ]
