"""BAN (Kim et al. 2018) for VQA v2 with ``setperm``'s PO-U at its eight glimpses (perm-optim paper,
appendix F.4).

* ``patch_ban(model, permutation="po-u" | "po-la" | "none" | "off", **encoder_kwargs)``: the plugin, for a model from the
  official ``base_model.build_ban`` or from ``build_ban`` below (``plugin.py``).
* ``build_ban(ntoken, num_ans_candidates, ...)``: a self-contained BAN-8 with the counting module whose
  ``state_dict`` is interchangeable with the official one (``model.py``, ``counting.py``).
* ``load_official(ban_root)``: the official modules from a user's checkout, fixed in memory for
  torch 2.x (``official.py``).
"""
from .model import BanModel, build_ban
from .official import build_official_ban, load_official
from .plugin import PERMUTATIONS, PatchedBan, patch_ban

__all__ = ["patch_ban", "PatchedBan", "PERMUTATIONS", "build_ban", "BanModel", "load_official", "build_official_ban"]
