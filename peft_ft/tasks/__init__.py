"""Task families, registered by name (`task.type` in a recipe): one file per family, each behind the interface
in `peft_ft.tasks.base`. Importing this package registers them all; `TASKS` is the filled registry.

Adding a family: a new module here with a `Task` subclass decorated with `@register_task`, and one import line below.
"""

# Importing a family registers it. Each module is light at import time.
from peft_ft.tasks import classification, ner, qa, seq2seq  # noqa: E402,F401
from peft_ft.tasks.base import TASKS, Task, register_task  # noqa: F401 - the registry and its interface, re-exported
