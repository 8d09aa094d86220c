"""Prefect flows: compose the tasks, fan out, choose the task runner. No maths here."""

import os

# Embedded default: a local ephemeral API without telemetry or the slow background services.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)
