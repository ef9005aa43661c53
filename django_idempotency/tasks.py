"""``@idempotent_task``: Celery tasks and Django tasks that run once per message.

A task queue delivers at least once: a message comes again after a worker
died, an acknowledgement got lost, or the same event was published twice.
The decorator goes *under* the task decorator (``@app.task``,
``@shared_task``, Django's ``@task``) and gives the task the semantics of
:func:`~django_idempotency.decorators.idempotent_function`: the first
delivery runs and stores its (JSON-serialisable) result; every later
delivery of the same key returns that result without running the body.

The key is, by default, the id of the message: Celery's task id (the same on
every redelivery of one message), or the id of the Django task's result
(``@task(takes_context=True)``). ``key=`` derives it from the arguments
instead, a business id such as an event id, which also deduplicates two
*publishes* of one event.

Neither Celery nor ``django.tasks`` is imported here unless a task runs
under it: the module imports without either installed.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, overload

from django.core.checks import CheckMessage, Warning
from django.core.exceptions import ImproperlyConfigured

from django_idempotency import redaction
from django_idempotency.exceptions import KeyMissing, RequestInProgress
from django_idempotency.functions import function_call, protected_block
from django_idempotency.policies import ProtocolOptions, Seconds
from django_idempotency.protocol import Call

Function = TypeVar("Function", bound=Callable[..., Any])
#: The attribute ``@idempotent_task`` leaves on the functions it wraps.
OPTIONS_ATTRIBUTE = "idempotency_task_options"


@dataclass(frozen=True)
class TaskOptions:
    """What ``@idempotent_task`` was given; read by the system checks."""

    key: Callable[..., str | int] | None
    scope: str | Callable[..., str] | None
    fingerprint: Callable[..., Any] | None
    options: ProtocolOptions
    retry: bool
    #: The resolved ``redact`` hook: the result to what is stored.
    redact: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Delivery:
    """The message a task body runs for, as far as the task system tells."""

    #: The message's id (Celery task id, Django task result id), if known.
    message_id: str | None
    #: The default scope: the task's registered name.
    scope: str
    #: The arguments the key and fingerprint functions see (no ``self``, no context).
    args: tuple[Any, ...]
    #: Raises the task system's retry for a duplicate in progress, or ``None``.
    retry: Callable[[RequestInProgress], BaseException] | None = None


@overload
def idempotent_task(func: Function, /) -> Function: ...


@overload
def idempotent_task(
    *,
    key: Callable[..., str | int] | None = None,
    scope: str | Callable[..., str] | None = None,
    fingerprint: Callable[..., Any] | None = None,
    mode: str | None = None,
    lease: Seconds | None = None,
    wait: Seconds | None = None,
    retention: Seconds | None = None,
    store: str | None = None,
    retry: bool = True,
    redact: Callable[[Any], Any] | str | None = None,
) -> Callable[[Function], Function]: ...


def idempotent_task(
    func: Any = None,
    /,
    *,
    key: Callable[..., str | int] | None = None,
    scope: str | Callable[..., str] | None = None,
    fingerprint: Callable[..., Any] | None = None,
    mode: str | None = None,
    lease: Seconds | None = None,
    wait: Seconds | None = None,
    retention: Seconds | None = None,
    store: str | None = None,
    retry: bool = True,
    redact: Callable[[Any], Any] | str | None = None,
) -> Any:
    """Make a Celery or Django task run once per message (or per ``key``).

    Place it under the task decorator::

        @shared_task(acks_late=True, reject_on_worker_lost=True)
        @idempotent_task(key=lambda event: event["id"])
        def book_capture(event): ...

    ``key``, ``scope`` (a string or a callable) and ``fingerprint`` are called
    with the task's arguments (without a bound task's ``self`` or a Django
    task's ``context``). The scope defaults to ``"task:" + the task's name``;
    the fingerprint to all the arguments. ``mode``, ``lease``, ``wait``,
    ``retention`` and ``store`` are as for ``idempotent_function``.

    A duplicate that finds the first delivery still running waits up to
    ``wait`` seconds for its result; then, under Celery and with ``retry``
    true, it raises Celery's ``Retry`` with a countdown of the time left on
    the first one's claim, so the duplicate comes back later and finds the
    stored result. Otherwise it raises ``RequestInProgress``.

    ``redact``, called with the result, returns what is stored instead (or
    its dotted path): the first delivery still returns the whole result, a
    redelivery returns what was stored.
    """
    if key is not None and not callable(key):
        raise ImproperlyConfigured(
            "idempotent_task(key=...) must be a callable receiving the task's arguments, "
            'for example key=lambda event: event["id"].'
        )
    settings = TaskOptions(
        key=key,
        scope=scope,
        fingerprint=fingerprint,
        options=ProtocolOptions(
            mode=mode, lease=lease, wait=wait, retention=retention, store=store
        ),
        retry=retry,
        redact=redaction.resolve(redact),
    )

    def decorator(function: Function) -> Function:
        if hasattr(function, "delay") or hasattr(function, "enqueue"):
            # Above the task decorator it would wrap the task object, not the body
            # a worker runs: the task would be unprotected.
            raise ImproperlyConfigured(
                f"@idempotent_task wraps the task {function!r}; place it under the task "
                "decorator (@app.task, @shared_task, @task), directly above the function."
            )
        if inspect.iscoroutinefunction(function):
            raise ImproperlyConfigured(
                f"idempotent_task does not support the coroutine function {function.__name__}."
            )

        # Known when decorating: the scope of a call that no task system runs.
        fallback_scope = f"task:{function.__module__}.{function.__qualname__}"

        @wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            delivery = current_delivery(wrapper, args, fallback_scope)
            call = _call(settings, delivery, kwargs)
            try:
                with protected_block(call, settings.options, settings.redact) as block:
                    if not block.replayed:
                        block.result = function(*args, **kwargs)
            except RequestInProgress as error:
                if settings.retry and delivery.retry is not None:
                    raise delivery.retry(error) from error
                raise
            return block.result

        setattr(wrapper, OPTIONS_ATTRIBUTE, settings)
        return wrapper  # type: ignore[return-value]

    return decorator(func) if func is not None else decorator


def _call(settings: TaskOptions, delivery: Delivery, kwargs: dict[str, Any]) -> Call:
    args = delivery.args
    if settings.key is not None:
        key = settings.key(*args, **kwargs)
    elif delivery.message_id:
        key = delivery.message_id
    else:
        raise KeyMissing(
            "This task call has no message id to key it by (called directly, or a Django "
            "task without takes_context=True): pass idempotent_task(key=...)."
        )
    if settings.scope is None:
        scope = delivery.scope
    else:
        scope = settings.scope(*args, **kwargs) if callable(settings.scope) else settings.scope
    if settings.fingerprint is not None:
        payload = settings.fingerprint(*args, **kwargs)
    else:
        payload = {"args": list(args), "kwargs": kwargs}
    return function_call(key, scope=str(scope), payload=payload)


def task_options(task_function: Any) -> TaskOptions | None:
    """The options ``@idempotent_task`` gave a task's function, if it did."""
    function = getattr(task_function, "__func__", task_function)
    while function is not None:
        options = getattr(function, OPTIONS_ATTRIBUTE, None)
        if isinstance(options, TaskOptions):
            return options
        function = getattr(function, "__wrapped__", None)
    return None


def current_delivery(
    function: Callable[..., Any], args: tuple[Any, ...], fallback: str | None = None
) -> Delivery:
    """What the running task system says about this call of ``function``.

    ``fallback`` is the scope where no task system names the task (by default
    ``"task:" + the function's dotted name``).
    """
    if fallback is None:
        fallback = f"task:{function.__module__}.{function.__qualname__}"
    return (
        _django_task_delivery(args, fallback)
        or _celery_delivery(function, args)
        or Delivery(message_id=None, scope=fallback, args=args)
    )


def _django_task_delivery(args: tuple[Any, ...], scope: str) -> Delivery | None:
    """A Django task run with ``takes_context=True``: its first argument is the context."""
    if not args:
        return None
    for module_name in ("django.tasks", "django_tasks"):
        module = sys.modules.get(module_name)
        context_class = getattr(module, "TaskContext", None)
        if context_class is not None and isinstance(args[0], context_class):
            result = args[0].task_result
            return Delivery(message_id=str(result.id), scope=scope, args=args[1:])
    return None


def _celery_delivery(function: Callable[..., Any], args: tuple[Any, ...]) -> Delivery | None:
    """The Celery task running ``function`` now (in a worker, eagerly, or called directly)."""
    if "celery" not in sys.modules:
        return None
    from celery import current_task

    task = current_task._get_current_object()  # None outside a task
    run = getattr(task, "run", None)
    # Another task calling this one's function as a plain function is no delivery of it.
    if task is None or getattr(run, "__func__", run) is not function:
        return None
    if args and args[0] is task:  # a bound task (bind=True): its first argument is self
        args = args[1:]
    request = task.request

    def retry(error: RequestInProgress) -> BaseException:
        # Celery's Retry re-publishes the message for later; past max_retries
        # it raises ``error`` itself, so the duplicate fails loudly, not silently.
        raised: BaseException = task.retry(countdown=error.retry_after, exc=error)
        return raised

    return Delivery(
        message_id=str(request.id) if request.id else None,
        scope=f"task:{task.name}",
        args=args,
        retry=retry if request.id and not request.is_eager else None,
    )


def check_celery_tasks(**kwargs: Any) -> list[CheckMessage]:
    """Warn about idempotent Celery tasks whose message a worker crash would lose.

    A system check (tag ``compatibility``, registered by the app config). It
    looks at the tasks of Celery's current app (the one a Django project's
    ``proj/celery.py`` creates) and does nothing where Celery is not in use.
    """
    if "celery" not in sys.modules:
        return []
    from celery import current_app

    messages: list[CheckMessage] = []
    for name, task in sorted(current_app.tasks.items()):
        if task_options(getattr(task, "run", None)) is None:
            continue
        if not task.acks_late:
            messages.append(
                Warning(
                    f"The idempotent task {name} acknowledges its message before it runs "
                    "(acks_late is off): a worker that dies mid-task loses the message.",
                    hint="Set acks_late=True on the task (or task_acks_late = True), with "
                    "reject_on_worker_lost=True: the redelivery is then safe to run.",
                    obj=name,
                    id="django_idempotency.W005",
                )
            )
        elif not task.reject_on_worker_lost:
            messages.append(
                Warning(
                    f"The idempotent task {name} has acks_late without reject_on_worker_lost: "
                    "when its worker process is killed, Celery acknowledges the message as "
                    "failed and it is not delivered again.",
                    hint="Set reject_on_worker_lost=True on the task (or "
                    "task_reject_on_worker_lost = True).",
                    obj=name,
                    id="django_idempotency.W006",
                )
            )
    return messages
