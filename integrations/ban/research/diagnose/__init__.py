"""``python -m integrations.ban diagnose``: where BAN's glimpses look, and which order BAN + PO learns.

    python -m integrations.ban diagnose --run runs/ban/compare/runs/po-u-s0      # -> <run>/diagnose_val.json
    python -m integrations.ban diagnose --sweep runs/ban/compare                 # -> <sweep>/results/diagnose.{json,md}

For a trained run on the synthetic dataset (``synth.py``) and every val question:

* **attention mass on the asked class**, per glimpse g: BAN's bilinear attention map of glimpse g is a
  softmax over all (box, word) pairs (BAN paper eq. 9), so ``sum_{i in asked, j} att[g, i, j]`` is the
  share of the glimpse's attention on the boxes of the class the question names (``<c>``; for
  ``count_left`` the counted class, not the landmark). Questions whose image has no box of that class
  (``exists`` / ``count`` with answer no / 0) are left out of it. ``chance`` is the share of the image's
  boxes that are of the asked class: the mass of attention spread uniformly over the boxes.
* **order of P** (BAN + PO only; each glimpse's box set has its own P, appendix F.4): the hard order of
  ``setperm.functional.hungarian(P)``, its Spearman rank correlation with the boxes' x-centres and areas (the
  geometry that "leftmost ..." / "largest ..." compare) over all real boxes and over the asked class's
  boxes only; sets with fewer than 3 boxes are skipped. Both signs are a valid order (right-to-left
  reads as well as left-to-right), so the mean of ``|rho|`` is reported next to the signed mean.
  ``input_order`` is the same statistic for the order of the feature file, which the generator draws at
  random (``synth._box_rows``): the chance level of ``|rho|`` for the same box counts.
* **sharpness of P**: the mean row entropy over real boxes (nats; 0 for a hard permutation), also
  divided by ``log n`` (1 for the uniform doubly-stochastic matrix; sets with n < 2 skipped).
* **eta** (appendix G): the learned step size in the checkpoint, and its per-epoch history from the
  run's ``summary.json``.

Which boxes are of the asked class comes from the files alone, as the oracle reads them
(``synth_oracle.decode_scenes``: each box decoded as the nearest class code; the question text parsed
by ``synth_world.parse_question``), never from the generator's hidden labels. The family of a question
is its ``synth_meta.json`` ``question_type``.

The statistics are functions of tensors (:func:`attention_mass`, :func:`hard_positions`,
:func:`set_rank_correlation`, :func:`relative_entropy`); :func:`diagnose_run` and
:func:`diagnose_sweep` apply them to checkpoints. Intermediate tensors are read from the public forward
(``(logits, att)``, the official signature) and a forward hook on the set encoder's permutation
optimiser; the model code is not changed.

Modules: ``statistics`` (the pure functions and what each number means), ``recording`` (the forward
hooks), ``run`` (one run, aggregated per family), ``sweep`` (every run of a sweep, over seeds), ``report``
(Markdown), ``cli`` (the subcommand).
"""
from .cli import add_diagnose_arguments, cmd_diagnose
from .report import run_markdown, sweep_markdown
from .run import diagnose_run
from .statistics import attention_mass, hard_positions, relative_entropy, set_rank_correlation
from .sweep import diagnose_sweep

__all__ = ["attention_mass", "hard_positions", "set_rank_correlation", "relative_entropy", "diagnose_run",
           "diagnose_sweep", "run_markdown", "sweep_markdown", "add_diagnose_arguments", "cmd_diagnose"]
