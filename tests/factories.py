"""factory-boy factories for the test suite."""

from __future__ import annotations

import uuid
from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from django_idempotency.models import IdempotencyKey
from tests.testapp.models import Order

PASSWORD = "correct horse battery staple"


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password(PASSWORD)


class OrderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Order

    item = factory.Sequence(lambda n: f"item{n}")


class IdempotencyKeyFactory(factory.django.DjangoModelFactory):
    """A stored key; by default a completed one that replays ``201 {"id": 1}``.

    Traits: ``in_progress`` (a live lease, as while the first request runs),
    ``stale`` (an in-progress claim whose lease ended: its worker died) and
    ``expired`` (a completed key past its retention).
    """

    class Meta:
        model = IdempotencyKey

    scope = "anonymous"
    key = factory.Sequence(lambda n: f"key-{n}")
    fingerprint = factory.LazyFunction(lambda: uuid.uuid4().hex * 2)
    method = "POST"
    path = "/plain/"
    state = IdempotencyKey.State.COMPLETED
    token = factory.LazyFunction(lambda: uuid.uuid4().hex)
    locked_until = None
    response_status = 201
    response_headers = factory.LazyFunction(lambda: [["Content-Type", "application/json"]])
    response_body = b'{"id": 1}'
    created = factory.LazyFunction(timezone.now)
    completed = factory.LazyAttribute(lambda o: o.created)
    expires = factory.LazyAttribute(lambda o: o.created + timedelta(hours=24))

    class Params:
        in_progress = factory.Trait(
            state=IdempotencyKey.State.IN_PROGRESS,
            locked_until=factory.LazyFunction(lambda: timezone.now() + timedelta(seconds=30)),
            response_status=None,
            response_headers=factory.LazyFunction(list),
            response_body=b"",
            completed=None,
        )
        stale = factory.Trait(
            state=IdempotencyKey.State.IN_PROGRESS,
            locked_until=factory.LazyFunction(lambda: timezone.now() - timedelta(seconds=1)),
            response_status=None,
            response_headers=factory.LazyFunction(list),
            response_body=b"",
            completed=None,
        )
        expired = factory.Trait(
            created=factory.LazyFunction(lambda: timezone.now() - timedelta(hours=25)),
        )
