"""Prefect flows: compose the tasks, fan out, choose the task runner. No maths here.

Process set-up for a flow run (embedded-mode settings, one malloc arena, Prefect's temporary API
started early) is explicit: ``flows.process``; ``configure_process`` is called by ``call_flow`` and by
the deployment entry points.
"""
