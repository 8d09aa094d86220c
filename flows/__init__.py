"""Prefect flows: compose the tasks, fan out, choose the task runner. No maths here.

Process set-up for a flow run (embedded-mode settings, one malloc arena) is explicit:
``flows.runners.configure_process``, called by ``call_flow`` and by the deployment entry points.
"""
