"""Fixtures of the benchmark tests."""
import textwrap

import pytest

# A stand-in with the released module's interface (PermNet(objects, input_features, mid_features,
# output_features); forward(boxes (B, 4, N), attention (B, N), features (B, N, F)) -> (B, output_features)),
# importing a sibling module as the released permnet.py imports permutation.py.
STAND_IN = {
    "permutation.py": "import torch\n\ndef pool(x):\n    return x.sum(-1)\n",
    "permnet.py": textwrap.dedent("""
        import torch
        from torch import nn
        from permutation import pool

        class PermNet(nn.Module):
            def __init__(self, objects, input_features, mid_features, output_features):
                super().__init__()
                self.f = nn.Linear(input_features, mid_features)
                self.out = nn.Linear(4 + 1 + mid_features, output_features)

            def forward(self, boxes, attention, features):
                x = torch.cat([boxes, attention.unsqueeze(1), self.f(features).transpose(1, 2)], 1)
                return self.out(pool(x))
        """),
}


@pytest.fixture
def released_stand_in(tmp_path):
    """A checkout of perm-optim with the stand-in released module, in ``tmp_path``; its root."""
    folder = tmp_path / "perm-optim" / "ban-vqa"
    folder.mkdir(parents=True)
    for name, text in STAND_IN.items():
        (folder / name).write_text(text, encoding="utf-8")
    return tmp_path / "perm-optim"
