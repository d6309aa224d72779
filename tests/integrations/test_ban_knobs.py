"""python -m integrations.ban knobs: one dataset per generator setting, plain BAN per setting, a report."""
import json

import pytest

from integrations.ban.cli import main
from integrations.ban.research.knobs import data_key, generator_knobs, knob_label, parse_knob

FLAGS = ["--num-hid", "16", "--gamma", "1", "--batch-size", "8", "--workers", "0", "--threads", "1", "--epochs", "1"]


def test_parse_knob_types_and_errors():
    assert parse_knob("base") == ("base", None)
    assert parse_knob("noise=0.5") == ("noise", 0.5)
    assert parse_knob("v-dim=16") == ("v_dim", 16) and knob_label("v-dim=16") == "v_dim=16"
    assert parse_knob("gamma=4") == ("gamma", 4)
    assert data_key("gamma=4") == "base" and data_key("clutter=2") == "clutter=2"
    assert {"images", "clutter", "noise", "v_dim", "class_scale", "max_boxes"} <= set(generator_knobs())
    with pytest.raises(ValueError, match="knob 'colour=3'.*name one of"):
        parse_knob("colour=3")
    with pytest.raises(ValueError, match="knob 'clutter=a lot'.*not a int"):
        parse_knob("clutter=a lot")


def test_knobs_writes_one_dataset_per_generator_setting_and_reports(tmp_path, capsys):
    out = tmp_path / "k"
    knobs = ["base", "images=12", "gamma=2"]
    # tiny datasets: the generator's defaults but few images (the knob 'images' replaces the base's)
    argv = ["knobs", "--out", str(out), *FLAGS, "--knobs", *knobs]
    from integrations.ban.research import knobs as K

    original = K.make_data

    def small(folder, text, seed):             # keep the test fast: 10 train images per dataset
        if (folder / "synth_meta.json").is_file():
            return folder
        from integrations.ban.research.synth import generate
        name, value = parse_knob(text)
        images = value if name == "images" else 10
        return generate(folder, images=images, val_images=4, questions=2, seed=seed, families=K.SANITY_FAMILIES,
                        fixed=False)

    K.make_data = small
    try:
        assert main(argv) == 0
    finally:
        K.make_data = original
    # the runs of a new scan start without a word about the --resume the user did not give
    assert "--resume" not in capsys.readouterr().out
    assert sorted(p.name for p in (out / "data").iterdir()) == ["base", "images=12"]
    results = json.loads((out / "results" / "knobs.json").read_text(encoding="utf-8"))
    assert [r["knob"] for r in results["rows"]] == ["base", "images=12", "gamma=2"]
    gamma = json.loads((out / "runs" / "gamma=2-s0" / "config.json").read_text(encoding="utf-8"))
    assert gamma["gamma"] == 2 and gamma["permutation"] == "off" and gamma["data_root"].endswith("base")
    base = json.loads((out / "runs" / "base-s0" / "config.json").read_text(encoding="utf-8"))
    assert base["gamma"] == 1
    for r in results["rows"]:
        assert len(r["steps_to_90"]) == 1 and (r["steps_to_90"][0] is None or 0 < r["steps_to_90"][0] <= r["steps"])
        assert 0 <= r["exists"]["mean"] <= 1 and 0 <= r["colour"]["mean"] <= 1 and r["seconds"]["mean"] > 0
    meta = json.loads((out / "data" / "images=12" / "synth_meta.json").read_text(encoding="utf-8"))
    assert set(meta["question_type"].values()) <= {"exists", "colour"}
    md = (out / "results" / "knobs.md").read_text(encoding="utf-8")
    assert "| images=12 |" in md and "| gamma=2 |" in md
    # a finished scan with the same settings changes nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # an unknown setting is refused before anything is written
    with pytest.raises(SystemExit):
        main(["knobs", "--out", str(tmp_path / "bad"), *FLAGS, "--knobs", "base", "wings=2"])
    assert not (tmp_path / "bad").exists()
