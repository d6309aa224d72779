"""Load the official BAN code (github jnhwkim/ban-vqa) from a user's checkout on torch 2.x.

The 2018 code does not import or train on a current stack. ``load_official(ban_root)`` imports its
modules without touching the user's files: every source file is parsed and compiled in memory after
five small, documented syntax-tree rewrites:

1. ``from torch._six import string_classes`` (utils.py): ``torch._six`` no longer exists;
   the import becomes ``string_classes = (str, bytes)``.
2. ``collections.Mapping`` / ``collections.Sequence`` (utils.trim_collate): moved to ``collections.abc``.
3. unconditional ``x.cuda()`` (train.py): becomes "``x.cuda()`` if CUDA is available, else ``x``", so
   the training helpers (e.g. ``compute_score_with_logits``) run on CPU.
4. ``nn.Dropout(..., inplace=True)`` (classifier.py, after a ReLU whose output autograd saves): modern
   autograd rejects the in-place write, so it becomes ``inplace=False`` (same values).
5. ``logits.view(...)`` (attention.py, ``BiAttention.forward_all``): the bilinear logits come from
   ``torch.einsum`` in bc.py, which may return a non-contiguous tensor (it does on CUDA), and
   ``view`` then fails ("view size is not compatible with input tensor's size and stride"); it
   becomes ``logits.reshape(...)`` (same values; a copy only where a view is impossible).

Tracebacks still point to the user's files and line numbers. The checkout's modules use bare top-level
names (``utils``, ``fc``, ...) that collide with other packages, so they are imported through a
private finder and every ``sys.modules`` entry they touch is restored afterwards.
"""
from __future__ import annotations

import ast
import collections.abc
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Dict, Iterable, Optional

import torch

__all__ = ["load_official", "build_official_ban", "check_root", "code_fingerprint", "OfficialBan", "REQUIRED_FILES"]

# Files that identify a ban-vqa checkout (base_model.py imports all the others but dataset.py).
REQUIRED_FILES = ("base_model.py", "attention.py", "bc.py", "fc.py", "classifier.py",
                  "language_model.py", "counting.py", "utils.py")

_CUDA_HELPER = "__setperm_cuda_if_available__"
_ABC_NAMES = frozenset(n for n in collections.abc.__all__ if not n.startswith("_"))
_LOCK = threading.Lock()


def _cuda_if_available(obj):
    """Fix 3: the official ``x.cuda()``, or ``x`` unchanged on a machine without CUDA."""
    return obj.cuda() if torch.cuda.is_available() else obj


class _Torch2Fixes(ast.NodeTransformer):
    """The five in-memory rewrites listed in the module docstring (``module``: the bare module name
    of the file being rewritten, for the fixes that apply to one file)."""

    def __init__(self, module: str = ""):
        super().__init__()
        self.module = module

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.module == "torch._six":  # fix 1
            compat = {"string_classes": "(str, bytes)", "int_classes": "int", "inf": "float('inf')",
                      "container_abcs": "__import__('collections.abc').abc"}
            stmts = []
            for alias in node.names:
                if alias.name not in compat:
                    raise ImportError(f"torch._six.{alias.name} has no known torch 2.x replacement")
                value = ast.parse(compat[alias.name], mode="eval").body
                stmts.append(ast.copy_location(
                    ast.Assign(targets=[ast.Name(alias.asname or alias.name, ast.Store())], value=value), node))
            return stmts
        return node

    def visit_Attribute(self, node: ast.Attribute):
        self.generic_visit(node)
        if (isinstance(node.value, ast.Name) and node.value.id == "collections"
                and node.attr in _ABC_NAMES):  # fix 2
            abc = ast.copy_location(ast.Attribute(node.value, "abc", ast.Load()), node)
            return ast.copy_location(ast.Attribute(abc, node.attr, node.ctx), node)
        return node

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "cuda" and not node.args and not node.keywords:
            # fix 3; ``torch.cuda`` itself is an attribute, never a zero-argument call of ``.cuda``
            return ast.copy_location(
                ast.Call(ast.Name(_CUDA_HELPER, ast.Load()), [func.value], []), node)
        if isinstance(func, ast.Attribute) and func.attr == "Dropout":  # fix 4
            for kw in node.keywords:
                if kw.arg == "inplace":
                    kw.value = ast.copy_location(ast.Constant(False), kw.value)
        if (self.module == "attention" and isinstance(func, ast.Attribute) and func.attr == "view"
                and isinstance(func.value, ast.Name) and func.value.id == "logits"):  # fix 5
            node.func = ast.copy_location(ast.Attribute(func.value, "reshape", func.ctx), func)
        return node


class _FixingLoader(importlib.abc.SourceLoader):
    def __init__(self, fullname: str, path: Path):
        self.fullname, self.path = fullname, path

    def get_filename(self, fullname: str) -> str:
        return str(self.path)

    def get_data(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def source_to_code(self, data, path, *, _optimize=-1):
        tree = ast.parse(data, filename=path)
        tree = ast.fix_missing_locations(_Torch2Fixes(self.fullname).visit(tree))
        return compile(tree, path, "exec", dont_inherit=True)

    def exec_module(self, module: ModuleType) -> None:
        module.__dict__[_CUDA_HELPER] = _cuda_if_available
        super().exec_module(module)


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Resolves bare names (``utils``, ``fc``, ``tools.compute_softscore``) to files of one checkout."""

    def __init__(self, root: Path):
        self.root = root
        self.served: set = set()

    def find_spec(self, fullname, path=None, target=None):
        rel = self.root.joinpath(*fullname.split("."))
        if rel.with_suffix(".py").is_file():
            self.served.add(fullname)
            file = rel.with_suffix(".py")
            return importlib.util.spec_from_file_location(fullname, file, loader=_FixingLoader(fullname, file))
        if rel.is_dir() and "." not in fullname and any(rel.glob("*.py")):
            self.served.add(fullname)
            init = rel / "__init__.py"
            if init.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, init, loader=_FixingLoader(fullname, init), submodule_search_locations=[str(rel)])
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = [str(rel)]
            return spec
        return None


def _top_level_names(root: Path) -> set:
    names = {p.stem for p in root.glob("*.py")}
    names |= {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    return names


@dataclass
class OfficialBan:
    """The official modules, imported from ``root`` with the torch 2.x fixes applied."""

    root: Path
    modules: Dict[str, ModuleType]

    def __getattr__(self, name: str) -> ModuleType:
        try:
            return self.__dict__["modules"][name]
        except KeyError:
            raise AttributeError(f"no official module {name!r} loaded (have {sorted(self.modules)})") from None


def check_root(ban_root) -> Path:
    """The resolved absolute path of a ban-vqa checkout; ``FileNotFoundError`` (``ValueError`` for an empty
    value) naming it and what is missing otherwise."""
    if ban_root is None or str(ban_root) == "":
        raise ValueError("ban_root: expected the path of a jnhwkim/ban-vqa checkout, got an empty value")
    root = Path(ban_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"ban_root: {str(root)!r} is not a directory (expected a jnhwkim/ban-vqa checkout)")
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"ban_root: {str(root)!r} is not a jnhwkim/ban-vqa checkout: missing {', '.join(missing)} "
            "(clone https://github.com/jnhwkim/ban-vqa and pass its root directory)")
    return root


def load_official(ban_root, modules: Iterable[str] = ("base_model", "train"),
                  with_dataset: bool = False) -> OfficialBan:
    """Import the official BAN modules from ``ban_root`` with the torch 2.x fixes applied in memory.

    Args:
        ban_root: path of a ``jnhwkim/ban-vqa`` checkout (its files are only read).
        modules: the modules to import; their own imports (``attention``, ``fc``, ``bc``,
            ``language_model``, ``classifier``, ``counting``, ``utils``) come along.
        with_dataset: also import ``dataset`` (needs h5py and the checkout's ``tools/``).

    Returns:
        ``OfficialBan`` whose attributes are the imported modules, e.g. ``off.base_model.build_ban``.
        The modules are not left in ``sys.modules`` under their bare names: names such as ``utils``
        keep meaning whatever they meant before the call.

    Raises:
        FileNotFoundError: ``ban_root`` is not a directory or lacks one of ``REQUIRED_FILES``.
        ImportError: an official module fails to import (the message names the checkout).
    """
    root = check_root(ban_root)
    wanted = list(modules) + (["dataset"] if with_dataset else [])
    names = _top_level_names(root)
    with _LOCK:
        saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
        for k in saved:
            del sys.modules[k]
        finder = _CheckoutFinder(root)
        sys.meta_path.insert(0, finder)
        try:
            for name in wanted:
                try:
                    importlib.import_module(name)
                except ImportError as e:
                    raise ImportError(f"could not import the official module {name!r} from {str(root)!r}: {e}") from e
            loaded = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
        finally:
            sys.meta_path.remove(finder)
            for k in [k for k in sys.modules if k.split(".")[0] in names]:
                del sys.modules[k]
            sys.modules.update(saved)
    return OfficialBan(root=root, modules={k: v for k, v in loaded.items() if "." not in k})


def code_fingerprint(ban_root) -> str:
    """sha256 of the checkout's top-level ``*.py`` files (names and contents): what the official model
    is built from, independent of where the checkout lies."""
    import hashlib

    root = check_root(ban_root)
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build_official_ban(ban_root, ntoken: int, num_ans_candidates: int, v_dim: int = 2048,
                       num_hid: int = 1280, op: str = "c", gamma: int = 8, official: Optional[OfficialBan] = None):
    """``base_model.build_ban`` of the checkout without its dataset: a stand-in object supplies the
    three attributes it reads (``dictionary.ntoken``, ``v_dim``, ``num_ans_candidates``).

    The counter's functions ``f[8:]``, which its forward never uses, are frozen (``requires_grad=False``)
    as in ``model.build_ban``: they never get a gradient, and DistributedDataParallel would otherwise
    fail at the second step of the plain official BAN (official training never changes them either)."""
    from .counting import freeze_unused_functions

    off = official if official is not None else load_official(ban_root)
    stand_in = SimpleNamespace(dictionary=SimpleNamespace(ntoken=int(ntoken)), v_dim=int(v_dim),
                               num_ans_candidates=int(num_ans_candidates))
    model = off.base_model.build_ban(stand_in, num_hid, op, gamma)
    freeze_unused_functions(model.counter)
    return model
