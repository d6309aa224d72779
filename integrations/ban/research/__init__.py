"""The synthetic-data research around the BAN integration, apart from what a BAN user needs.

* ``synth``, ``synth_world``, ``synth_features``, ``synth_oracle``: the synthetic dataset in the official
  layout, its question families and its oracle (``python -m integrations.ban synth``).
* ``compare``: every variant x every seed trained identically, and the per-family report.
* ``diagnose``: where BAN's glimpses look and which order BAN + PO learns, per run or per sweep.
* ``knobs``: plain BAN's accuracy on the order-free families per generator / model setting.

Importing ``integrations.ban`` (or its ``train``) does not import this package: the CLI imports the research
modules inside the functions that build its parser and run its subcommands, and ``train`` imports
``synth_oracle`` only for ``--oracle-relevance`` runs.
"""
