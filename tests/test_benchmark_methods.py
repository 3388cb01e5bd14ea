"""benchmarks/methods.py --from-store: one row per evaluated branch, read from stage manifests alone."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _methods():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(store: Path, stage: str, key: str, params: dict, inputs: dict, digest: str, summary: dict,
           code: str = "v1", created: float = 0.0) -> None:
    d = store / stage / key
    d.mkdir(parents=True)
    manifest = {"key": key, "params": params, "inputs": inputs, "output_digest": digest, "summary": summary,
                "code": code, "created": created}
    (d / "manifest.json").write_text(json.dumps(manifest))


def _evaluation(fid: float) -> dict:
    model = {"params": 10, "macs": 100, "fid": fid, "fid_std": 0.01, "ssim": 0.9}
    return {"teacher": {**model, "fid": 0.9}, "pruned": model, "macs_ratio": 0.6, "params_ratio": 0.6,
            "speedup": 1.3, "fid_extractor": "classifier", "sampler": "ddim", "sampler_steps": 50,
            "n_samples": 8, "seeds": [0]}


def test_rows_from_store_walks_each_chain_once_even_when_one_branch_was_scored_twice(tmp_path):
    store = tmp_path / "store"
    _entry(store, "teacher", "T", {}, {}, "t", {})
    for seed, fid in ((0, 1.1), (1, 1.2)):
        score_params = {"criterion": "magnitude", "thr": None, "seed": seed, "n_batches": 1}
        _entry(store, "score", f"S{seed}", score_params, {"teacher": "T"}, f"s{seed}", {"thr": None})
        _entry(store, "prune", f"P{seed}", {"seed": seed, "target_macs": 0.6}, {"teacher": "T", "scores": f"S{seed}"},
               f"p{seed}", {"criterion": "magnitude", "target_macs": 0.6})
        _entry(store, "finetune", f"F{seed}", {"seed": seed}, {"student": f"P{seed}"}, f"f{seed}", {"steps": 800})
        _entry(store, "evaluate", f"E{seed}", {}, {"student": f"F{seed}"}, f"e{seed}", _evaluation(fid))
    # seed 1 scored again under another code version: a second score entry with the same output
    _entry(store, "score", "S1-again", {"criterion": "magnitude", "thr": None, "seed": 1, "n_batches": 1},
           {"teacher": "T"}, "s1", {"thr": None})

    rows, left_out = _methods().rows_from_store(store)

    assert left_out == []
    expected = [("magnitude-macs0.6-seed0", 1.1), ("magnitude-macs0.6-seed1", 1.2)]
    assert [(r["label"], r["fid"]) for r in rows] == expected
    assert all(r["method"] == "magnitude" and r["teacher_fid"] == 0.9 for r in rows)


def test_a_branch_evaluated_under_two_code_versions_keeps_the_one_most_branches_share(tmp_path):
    store = tmp_path / "store"
    _entry(store, "teacher", "T", {}, {}, "t", {})
    for seed in (0, 1, 2):
        _entry(store, "score", f"S{seed}", {"criterion": "random", "thr": None, "seed": seed}, {"teacher": "T"},
               f"s{seed}", {"thr": None})
        _entry(store, "prune", f"P{seed}", {"seed": seed, "target_macs": 0.6}, {"teacher": "T", "scores": f"S{seed}"},
               f"p{seed}", {"criterion": "random", "target_macs": 0.6})
        _entry(store, "finetune", f"F{seed}", {"seed": seed}, {"student": f"P{seed}"}, f"f{seed}", {"steps": 800})
        _entry(store, "evaluate", f"E{seed}", {}, {"student": f"F{seed}"}, f"e{seed}", _evaluation(1.0 + seed / 10),
               created=1.0)
    # seed 1 evaluated again, later, by changed evaluation code: newer, but not what the other seeds used
    _entry(store, "evaluate", "E1-new", {}, {"student": "F1"}, "e1-new", _evaluation(9.9), code="v2", created=2.0)

    methods = _methods()
    rows, left_out = methods.rows_from_store(store)

    assert [r["fid"] for r in rows] == [1.0, 1.1, 1.2]
    assert [(r["label"], r["fid"]) for r in left_out] == [("random-macs0.6-seed1", 9.9)]
    table = methods.aggregate(rows, 800)
    note = "random-macs0.6-seed1: an evaluation under other stage code (FID 9.900"
    assert note in methods.render(table, rows, left_out)


def test_seeds_plot_is_drawn_only_when_there_is_a_pairing_to_show(tmp_path):
    methods = _methods()
    rows = [{"method": m, "target_macs": 0.6, "seed": s, "fid": 1.0 + s / 10 + i / 100}
            for i, m in enumerate(("taylor", "diff-pruning-thr0.05")) for s in (0, 1)]
    methods.seeds_plot(rows[:1], tmp_path / "one.png")
    methods.seeds_plot(rows, tmp_path / "two.png")
    assert not (tmp_path / "one.png").exists()
    assert (tmp_path / "two.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
