"""integrations.common: the run rule, safe loading, atomic rotating checkpoints, corrupt-file fall-back,
seeding, progress lines."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys

import pytest
import torch

from integrations.common import (CheckpointError, RunError, UnsafePickleError, generator, load_latest, open_run,
                                 read_checkpoint, restricted_load, run_command, step_seed)
from integrations.common.checkpoint import rng_state, set_rng_state, write_checkpoint
from integrations.common.progress import LineProgress
from integrations.common.safe_pickle import restricted_loads


class Payload:
    """Unpickling this creates ``marker``: stands for any command a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    return m, torch.optim.Adam(m.parameters(), lr=0.1)


CFG = {"lr": 0.1, "seed": 0, "epochs": 2, "threads": 1}


def test_new_folder_starts_and_a_run_is_refused_without_a_way_out(tmp_path):
    out = tmp_path / "run"
    run = open_run(out, CFG, log=lambda s: None)
    assert run.state is None and (out / "config.json").is_file() and run.config["run_id"]
    with pytest.raises(RunError) as err:
        open_run(out, CFG, log=lambda s: None)
    msg = str(err.value)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg and "--out" in msg and "\n" not in msg


def test_empty_folder_starts_and_foreign_folder_is_refused_even_with_overwrite(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    open_run(empty, CFG, log=lambda s: None)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunError, match="holds no run"):
            open_run(foreign, CFG, log=lambda s: None, **kw)
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_resume_refuses_each_changed_setting_by_name(tmp_path):
    open_run(tmp_path / "r", CFG, log=lambda s: None)
    with pytest.raises(RunError) as err:
        open_run(tmp_path / "r", {**CFG, "lr": 0.01, "seed": 3, "threads": 2}, resume=True, log=lambda s: None)
    msg = str(err.value)
    assert "lr 0.1 -> 0.01" in msg and "seed 0 -> 3" in msg and "threads" not in msg     # threads: operational
    # a length that may grow is accepted and recorded
    run = open_run(tmp_path / "r", {**CFG, "epochs": 5}, resume=True, may_change=("epochs",), log=lambda s: None)
    saved = json.loads((tmp_path / "r" / "config.json").read_text(encoding="utf-8"))
    assert saved["epochs"] == 5 == run.config["epochs"]


def test_a_new_run_on_a_run_with_other_settings_names_them_not_resume(tmp_path):
    """--resume would refuse the changed settings too: the refusal names them and offers only the ways
    out that work; a change --resume accepts (a length that may grow) still points to --resume."""
    open_run(tmp_path / "r", CFG, log=lambda s: None)
    with pytest.raises(RunError) as err:
        open_run(tmp_path / "r", {**CFG, "lr": 0.01, "threads": 2}, log=lambda s: None)
    msg = str(err.value)
    assert "started with other settings (lr 0.1 -> 0.01)" in msg and "--overwrite" in msg and "--resume" not in msg
    with pytest.raises(RunError, match="continue it with --resume"):
        open_run(tmp_path / "r", {**CFG, "epochs": 5}, may_change=("epochs",), log=lambda s: None)


def test_a_sweep_without_checkpoints_neither_makes_their_folder_nor_speaks_of_them(tmp_path):
    # a sweep keeps its progress in its cells: no empty checkpoints/ folder, no "(no checkpoint yet)" in a refusal
    quiet = lambda s: None
    open_run(tmp_path / "r", CFG, checkpoints=False, log=quiet)
    assert not (tmp_path / "r" / "checkpoints").exists()
    for cfg in (CFG, {**CFG, "lr": 0.01}):
        with pytest.raises(RunError) as err:
            open_run(tmp_path / "r", cfg, checkpoints=False, log=quiet)
        assert "checkpoint" not in str(err.value) and f"--out {tmp_path / 'r'} already holds a run" in str(err.value)
    # a run with checkpoints still names where it stands
    open_run(tmp_path / "c", CFG, log=quiet)
    with pytest.raises(RunError, match=r"already holds a run \(no checkpoint yet\)"):
        open_run(tmp_path / "c", CFG, log=quiet)


def test_extending_a_finished_run_that_is_interrupted_is_not_finished(tmp_path):
    """A finished sweep extended with --resume (more seeds) and stopped before its new record must not
    report itself finished on the next --resume: config.json already lists the longer settings."""
    quiet = lambda s: None
    run = open_run(tmp_path / "r", {**CFG, "seeds": [0, 1]}, log=quiet)
    run.finish({"done": 2})
    longer = {**CFG, "seeds": [0, 1, 2]}
    extended = open_run(tmp_path / "r", longer, resume=True, may_change=("seeds",), log=quiet)
    assert not extended.finished and not (tmp_path / "r" / "summary.json").exists()
    # ... interrupted here; the same command again continues instead of printing the old record
    again = open_run(tmp_path / "r", longer, resume=True, may_change=("seeds",), log=quiet)
    assert not again.finished
    again.finish({"done": 3})
    assert open_run(tmp_path / "r", longer, resume=True, may_change=("seeds",), log=quiet).summary["done"] == 3


def test_overwrite_replaces_the_run(tmp_path):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    run.save(3, model=m, optimizer=opt)
    again = open_run(tmp_path / "r", {**CFG, "lr": 0.5}, overwrite=True, log=lambda s: None)
    assert again.run_id != run.run_id and again.state is None
    assert not any((tmp_path / "r" / "checkpoints").iterdir())
    with pytest.raises(RunError, match="exclude"):
        open_run(tmp_path / "r", CFG, overwrite=True, resume=True)


@pytest.mark.parametrize("damaged", ["config.json", "summary.json"])
def test_overwrite_replaces_a_run_whose_records_cannot_be_read(tmp_path, damaged):
    """The refusal of an unreadable record names --overwrite as a way out: --overwrite must then work."""
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    run.finish({"loss": 0.25})
    del run
    (tmp_path / "r" / damaged).write_text("", encoding="utf-8")     # e.g. a power cut before it reached the disk
    for kw in ({}, {"resume": True}):
        with pytest.raises(RunError, match="--overwrite"):
            open_run(tmp_path / "r", CFG, log=lambda s: None, **kw)
    again = open_run(tmp_path / "r", CFG, overwrite=True, log=lambda s: None)
    assert again.state is None and not again.finished and not (tmp_path / "r" / "summary.json").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text(encoding="utf-8"))["run_id"] == again.run_id


def test_finished_run_with_same_settings_changes_nothing(tmp_path):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    run.save(1, model=m, optimizer=opt)
    run.finish({"loss": 0.25})
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}
    for kw in ({}, {"resume": True}):
        again = open_run(tmp_path / "r", {**CFG, "threads": 2}, log=lambda s: None, **kw)
        assert again.finished and again.summary["loss"] == 0.25
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")} == before


def test_resume_restores_model_optimizer_rng_and_extra(tmp_path):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    run.save(5, model=m, optimizer=opt, extra={"history": [{"loss": 1.5}], "seconds": 2.0})
    expected = torch.rand(3)
    m2, opt2 = _model()
    resumed = open_run(tmp_path / "r", CFG, resume=True, log=lambda s: None)
    extra = resumed.restore(model=m2, optimizer=opt2)
    assert resumed.start_step == 5 and extra == {"history": [{"loss": 1.5}], "seconds": 2.0}
    torch.testing.assert_close(m2.state_dict(), m.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(opt2.state_dict()["state"], opt.state_dict()["state"], rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)   # RNG restored to the save point


def test_a_checkpoint_that_does_not_fit_the_model_or_optimizer_is_one_line(tmp_path):
    """Code changed since the checkpoint (a parameter added, or one frozen so the optimiser holds fewer): a
    CheckpointError naming the file and the part, not torch's error (the CLIs print it as one line)."""
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    run.save(5, model=m, optimizer=opt)
    resumed = open_run(tmp_path / "r", CFG, resume=True, log=lambda s: None)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match=r"step_0*5\.pt: its model state does not fit"):
        resumed.restore(model=wider)
    m2, _ = _model()
    fewer = torch.optim.Adam(list(m2.parameters())[:1])
    with pytest.raises(CheckpointError, match="its optimizer state does not fit") as e:
        resumed.restore(model=m2, optimizer=fewer)
    assert "\n" not in str(e.value)
    # out of device memory while loading is not "does not fit": torch's error goes through
    m3, opt3 = _model()

    def no_memory(state_dict):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    opt3.load_state_dict = no_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        resumed.restore(model=m3, optimizer=opt3)


def test_rng_state_roundtrip_through_the_safe_loader(tmp_path):
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()                      # leave a cached Gaussian in numpy's state
    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    expect = (random.random(), np.random.normal(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    got = (random.random(), np.random.normal(), torch.rand(1))
    assert got[:2] == expect[:2] and torch.equal(got[2], expect[2])


def test_rotation_keeps_the_newest_of_this_run_by_the_step_inside(tmp_path):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None, keep_last=2)
    m, opt = _model()
    ck = tmp_path / "r" / "checkpoints"
    # another run's file with a larger step in its name: not ours, never deleted
    write_checkpoint(ck, run_id="someone-else", step=999, config={})
    for s in (1, 2, 3, 4):
        run.save(s, model=m, optimizer=opt)
    names = sorted(p.name for p in ck.glob("step_*.pt"))
    assert names == ["step_00000003.pt", "step_00000004.pt", "step_00000999.pt"]
    # the newest checkpoint OF THIS RUN is found even though a foreign file has a larger step
    resumed = open_run(tmp_path / "r", CFG, resume=True, log=lambda s: None)
    assert resumed.start_step == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    run.save(1, model=m, optimizer=opt)
    newest = run.save(2, model=m, optimizer=opt)
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    lines = []
    resumed = open_run(tmp_path / "r", CFG, resume=True, log=lines.append)
    assert resumed.start_step == 1
    assert len(lines) == 1 and newest.name in lines[0] and "warning" in lines[0]
    assert (newest.parent / (newest.name + ".corrupt")).is_file()


def test_no_intact_checkpoint_is_one_error_naming_the_folder(tmp_path):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    path = run.save(1, model=_model()[0])
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RunError) as err:
        open_run(tmp_path / "r", CFG, resume=True, log=lambda s: None)
    assert str(run.checkpoints) in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_with_a_payload_is_refused_and_the_payload_does_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    good = run.save(1, model=m, optimizer=opt)
    # a genuine checkpoint with the payload tucked into its ``extra`` field
    state = torch.load(good, weights_only=True)
    state["step"] = 2
    state["extra"] = {"note": Payload(marker)}
    bad = good.with_name("step_00000002.pt")
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert str(bad) in str(err.value) and "refused" in str(err.value)
    lines = []
    resumed = open_run(tmp_path / "r", CFG, resume=True, log=lines.append)      # falls back to step 1
    assert resumed.start_step == 1 and "refused" in lines[0]
    with pytest.warns(RuntimeWarning, match="unreadable"):
        torch.save(state, bad)
        assert load_latest(tmp_path / "r")["step"] == 1
    assert not marker.exists()


@pytest.mark.parametrize("encoding", ["ascii", "latin-1", "cp1252"])
def test_commands_print_what_the_output_encoding_cannot_show_as_escapes(monkeypatch, encoding):
    """A report's minus sign or dash on a stdout that cannot encode it (a C or ISO-8859 locale, a
    Windows code page) is escaped, not a UnicodeEncodeError at the end of a run."""
    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    assert run_command(lambda argv: print("po-u \u2212 none: 1 \u00b1 2 \u2013 3"), "prog") == 0
    out.flush()
    printed = out.buffer.getvalue().decode(encoding)
    assert printed.startswith("po-u \\u2212 none: 1 ") and printed.endswith(" 3\n")
    assert "\u00b1" in printed or "\\xb1" in printed


def test_restricted_unpickler_refuses_payloads_and_reads_plain_and_numpy_data(tmp_path):
    import numpy as np

    marker = tmp_path / "PWNED"
    evil = tmp_path / "dictionary.pkl"
    evil.write_bytes(pickle.dumps([{"a": 0}, ["a", Payload(marker)]]))
    with pytest.raises(UnsafePickleError, match=r"refused to load global _?io\.open"):
        restricted_load(evil)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps([{"what": 0, "is": 1}, ["what", "is"], {3: 0.5}, (1, None, True), {1, 2}]))
    assert restricted_load(plain) == [{"what": 0, "is": 1}, ["what", "is"], {3: 0.5}, (1, None, True), {1, 2}]
    # every protocol a writer may have used: 0 - 2 (Python 3 writes bytes there as _codecs.encode(text,
    # "latin1")), 4, and 5 (Python 3.14's default), which stores contiguous arrays (C or Fortran
    # order) as raw buffers
    data = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        arrays = tmp_path / f"batch{protocol}.pkl"
        arrays.write_bytes(pickle.dumps({b"data": data, b"fortran": np.asfortranarray(data.astype(np.float64)),
                                         b"strided": data[:, ::2], b"labels": [1, 2], b"x": np.float32(1.5)},
                                        protocol=protocol))
        with pytest.raises(UnsafePickleError):
            restricted_load(arrays)                            # numpy only when asked for
        got = restricted_load(arrays, allow_numpy=True)
        assert got[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]] and got[b"data"].dtype == np.uint8
        assert got[b"fortran"].tolist() == data.tolist() and got[b"fortran"].dtype == np.float64
        assert got[b"strided"].tolist() == [[0, 2], [3, 5]] and got[b"x"] == np.float32(1.5)
    # the stand-in for _codecs.encode rebuilds latin1 bytes only: no other codec is looked up
    assert restricted_loads(pickle.dumps(b"\x00\xff", protocol=2)) == b"\x00\xff"
    crafted = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00rot_13\x86R."
    with pytest.raises(UnsafePickleError, match="rot_13"):
        restricted_loads(crafted)


def test_step_seed_streams_are_keyed_not_sequential():
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(0, s) for s in range(100)} | {step_seed(1, s) for s in range(100)}) == 200
    assert step_seed(1, 0) != step_seed(0, 1)
    # what the docstring warns of: keys of other lengths that differ only by trailing zeros, or by how a
    # key of 2**32 or more splits into 32-bit words, give the same seed
    assert step_seed(7, 3) == step_seed(7, 3, 0) and step_seed(2**32) == step_seed(0, 1)
    assert step_seed(7, 3) != step_seed(7, 3, 1)
    assert torch.equal(torch.rand(4, generator=generator(3, 2)), torch.rand(4, generator=generator(3, 2)))
    with pytest.raises(ValueError):
        step_seed(-1)
    with pytest.raises(ValueError, match="keys"):
        step_seed()


def test_step_seed_gives_the_seeds_the_committed_results_were_drawn_with():
    """Integer keys: numpy SeedSequence, 63 bits (the sorting, mosaic and BAN streams); keys with a name:
    crc32 of the keys joined by "/" (the set tasks' fixed sets). Changing either would change the data."""
    import zlib

    from integrations.common import seeded_generator

    assert (step_seed(0, 5), step_seed(3, 2, 1), step_seed(7)) == (6102389744414414618, 4404663168949438663,
                                                                  8460147692890830636)
    assert step_seed(0, "kth", "test", 8) == zlib.crc32(b"0/kth/test/8") == 354872504
    assert step_seed(1, "max", "val", (5, 6)) == 622944765
    assert torch.equal(torch.rand(3, generator=generator(0, "kth", "test", 8)),
                       torch.rand(3, generator=torch.Generator().manual_seed(354872504)))
    assert torch.equal(torch.rand(3, generator=seeded_generator(11)),
                       torch.rand(3, generator=torch.Generator().manual_seed(11)))


def test_run_folder_of_a_run_or_of_one_of_its_checkpoints():
    from pathlib import Path

    from integrations.common import run_folder

    assert run_folder("runs/a/checkpoints/step_00000003.pt") == Path("runs/a")
    assert run_folder(Path("runs/a")) == Path("runs/a")
    # a checkpoint kept outside a checkpoints folder: its own folder, not the one above it
    assert run_folder("kept/final.pt") == Path("kept")
    assert run_folder("final.pt") == Path(".")


def test_mean_std_text_for_missing_single_and_several_values():
    from integrations.common.stats import fmt_mean_std, summarize

    assert fmt_mean_std(summarize([0.5, 0.7])) == "60.0 ± 14.1"
    assert fmt_mean_std(summarize([0.25, 0.75]), 1.0, 2) == "0.50 ± 0.35"
    one = summarize([0.5])
    assert fmt_mean_std(one) == "50.0 ± 0.0" and fmt_mean_std(one, std_of_one=False) == "50.0"
    assert fmt_mean_std(None) == "-" and fmt_mean_std({"mean": None, "std": None, "n": 0}, missing="n/a") == "n/a"


def test_line_progress_writes_step_loss_and_eta():
    buf = io.StringIO()
    bar = LineProgress(total=10, desc="train", interval=0.0, stream=buf)
    bar.set_postfix(loss="0.5")
    bar.update(4)
    bar.close()
    first = buf.getvalue().splitlines()[0]
    assert "train: step 4/10 (40%)" in first and "loss=0.5" in first and "ETA" in first


def test_stats_summary_and_paired_test():
    from integrations.common.stats import binomial_se, fmt_mean_std, paired_test, summarize

    s = summarize([0.5, 0.7, 0.6])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert fmt_mean_std(s) == "60.0 ± 10.0"
    # a constant shift is detected as certain, no shift as no evidence
    assert paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])["p"] == 0.0
    assert paired_test([0.6, 0.7, 0.8], [0.6, 0.7, 0.8])["p"] == 1.0
    t = paired_test([0.61, 0.72, 0.80, 0.66], [0.50, 0.69, 0.71, 0.60])
    from scipy import stats

    assert t["p"] == pytest.approx(stats.ttest_rel([0.61, 0.72, 0.80, 0.66], [0.50, 0.69, 0.71, 0.60]).pvalue)
    assert t["diff_mean"] == pytest.approx(0.0725)
    assert paired_test([0.5], [0.4])["p"] is None
    with pytest.raises(ValueError):
        paired_test([0.5, 0.6], [0.4])
    assert binomial_se(0.5, 2500) == pytest.approx(0.01)


def test_load_latest_names_the_checkpoint_it_read_from_a_folder_or_a_file(tmp_path):
    run = open_run(tmp_path / "r", CFG, log=lambda s: None)
    m, opt = _model()
    first = run.save(1, model=m, optimizer=opt)
    newest = run.save(2, model=m, optimizer=opt)
    assert load_latest(tmp_path / "r")["path"] == str(newest)
    state = load_latest(first)                  # eval / diagnose of one given checkpoint report it
    assert state["path"] == str(first) and state["step"] == 1


class _FakeCuda:
    """torch.cuda as seen on a machine with ``count`` GPUs, recording the RNG states set."""

    def __init__(self, monkeypatch, count):
        self.set = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": self.set.__setitem__(device, s))

        def all_states(states):
            for i, s in enumerate(states):
                if i >= count:
                    raise IndexError("list index out of range")
                self.set[i] = s

        monkeypatch.setattr(torch.cuda, "set_rng_state_all", all_states)


def test_resume_on_fewer_gpus_restores_the_cuda_rng_states_of_the_devices_there(monkeypatch):
    state = rng_state()
    saved = [torch.full((4,), i, dtype=torch.uint8) for i in range(4)]      # a run on 4 GPUs
    fake = _FakeCuda(monkeypatch, count=1)
    set_rng_state({**state, "cuda": saved})
    assert list(fake.set) == [0] and torch.equal(fake.set[0], saved[0])
    fake = _FakeCuda(monkeypatch, count=0)                                  # CUDA without a visible device
    set_rng_state({**state, "cuda": saved})
    assert fake.set == {}


def test_the_mps_generator_state_is_saved_and_restored_where_mps_runs(monkeypatch, tmp_path):
    """On Apple's GPU (``mps``) dropout draws from the MPS generator: its state goes into the checkpoint
    and comes back on resume (a stand-in ``torch.mps`` here), and is ignored where MPS is absent."""
    import types

    held = {"state": torch.arange(8, dtype=torch.uint8)}
    fake = types.SimpleNamespace(get_rng_state=lambda: held["state"].clone(),
                                 set_rng_state=lambda s: held.__setitem__("state", s.clone()))
    monkeypatch.setattr(torch, "mps", fake, raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    state = rng_state()
    assert torch.equal(state["mps"], torch.arange(8, dtype=torch.uint8))
    torch.save(state, tmp_path / "s.pt")
    held["state"] = torch.zeros(8, dtype=torch.uint8)
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(held["state"], torch.arange(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "mps" not in rng_state()
    held["state"] = torch.zeros(8, dtype=torch.uint8)
    set_rng_state(state)                                    # resumed where there is no MPS: left alone
    assert torch.equal(held["state"], torch.zeros(8, dtype=torch.uint8))


def test_device_index_beyond_the_machine_s_gpus_is_one_line(monkeypatch):
    import argparse

    from integrations.common import CommandError, device_name, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(CommandError, match=r"^--device: 'cuda:7' requested but this machine has 2 CUDA devices "
                                           r"\(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:7")
    with pytest.raises(argparse.ArgumentTypeError, match="cuda:7"):
        device_name("cuda:7")


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_interruption_is_reported_by_rank_0_only(monkeypatch, capsys, tmp_path, rank, printed):
    """Under torchrun every rank stops at the same step; only rank 0 wrote the checkpoint, so only
    it says where (another rank would say that no checkpoint was written). Every rank exits 130."""
    import signal

    from integrations.common import RunInterrupted

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    path = tmp_path / "step_00000003.pt" if rank == "0" else None

    def main(argv):
        raise RunInterrupted(signal.SIGINT, 3, path, tmp_path)
    assert run_command(main, "prog") == 130
    assert ("interrupted" in capsys.readouterr().err) == printed


def test_a_damaged_checkpoint_is_not_called_unsafe(tmp_path):
    """torch's safe loader refuses a damaged pickle as it refuses a dangerous one: the message tells
    them apart (an object refused unloaded, or a file that torch.save did not write)."""
    bad = tmp_path / "step_00000001.pt"
    bad.write_bytes(b"garbage\n")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(bad)
    assert "damaged" in str(err.value) and "refused" not in str(err.value)


def _parsers(parser, name):
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_command_option_says_what_it_does_and_its_default_once():
    import argparse

    from integrations.ban.cli import build_parser as ban
    from integrations.ban.research.synth import build_parser as synth
    from integrations.common import HelpFormatter
    from integrations.mosaic.__main__ import parser as mosaic
    from integrations.set_tasks.cli import build_parser as set_tasks
    from integrations.sorting.cli import build_parser as sorting

    for name, parser in (p for top, b in [("ban", ban), ("synth", synth), ("mosaic", mosaic), ("set_tasks", set_tasks),
                                          ("sorting", sorting)] for p in _parsers(b(), top)):
        assert parser.formatter_class is HelpFormatter, name
        formatter = HelpFormatter(name)
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action)
            assert action.help, f"{name} {action.option_strings[-1]} has no help"
            assert text.count("default") <= 1 and "(default: [" not in text, (name, text)     # lists as typed
        parser.format_help()                         # (every help string formats)
