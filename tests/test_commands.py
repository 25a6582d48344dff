"""The measuring commands end to end on a tiny model with a tokenizer: trace, calibrate,
fit-estimator, eval, simulate."""

import json

import numpy as np
import pytest

from moespec.cli import main
from moespec.speculate.traces import RoutingTrace
from tiny import save_model, save_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmoe")
    save_model("olmoe", d, experts=8, top_k=2, num_hidden_layers=3, vocab_size=300)
    save_tokenizer(d, vocab_size=300)
    return d


def test_trace_writes_routes_and_heatmap(model_dir, tmp_path, capsys):
    out = tmp_path / "routes.npz"
    assert main(["trace", "--model", str(model_dir), "--out", str(out), "--tokens", "512", "--hidden",
                 "--prefetch", "lookahead"]) == 0
    trace = RoutingTrace.load(out)
    assert trace.ids.shape == (512, 3, 2) and trace.hidden.shape == (512, 3, 32)
    assert trace.guesses.shape == (512, 3, 2) and (trace.guesses[:, 0] == -1).all() and (trace.guesses[:, 1:] >= 0).all()
    assert np.allclose(trace.usage().sum(axis=1), 2.0)  # each token picks k=2 experts per layer
    assert trace.previous[:3].tolist() == [-1, 0, 1]  # the trace is scored in 256-token chunks
    assert trace.previous[256] == -1
    assert main(["fit-estimator", "--model", str(model_dir), "--routes", str(out), "--steps", "5",
                 "--out", str(tmp_path / "est.safetensors")]) == 0
    assert (tmp_path / "routes.png").stat().st_size > 0
    assert "usage entropy" in capsys.readouterr().err


def test_calibrate_then_lookahead_uses_default_vectors(model_dir):
    assert main(["calibrate", "--model", str(model_dir), "--tokens", "512"]) == 0
    assert (model_dir / "default_vectors.safetensors").is_file()
    from moespec import LLM

    llm = LLM(model_dir, expert_cache="50%", prefetch="lookahead")
    assert llm.speculation.predictor.dv is not None


def test_fit_estimator_writes_file_and_report(model_dir, capsys, tmp_path):
    assert main(["fit-estimator", "--model", str(model_dir), "--tokens", "2048", "--steps", "60"]) == 0
    report = json.loads((model_dir / "estimators.json").read_text())
    assert report["loss_last"] < report["loss_first"]
    assert "recall@k lookahead" in capsys.readouterr().err
    out = tmp_path / "next.safetensors"
    assert main(["fit-estimator", "--model", str(model_dir), "--tokens", "2048", "--steps", "20",
                 "--next-token-head", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["next_token"] and report["command"].endswith("--next-token-head")
    from moespec import LLM

    layers = LLM(model_dir).spec.moe_layer_ids
    last, first = layers[-1], layers[0]
    assert f"{last}_{first}" in report["heads"]
    assert f"layer {last} -> the next token's {first}: recall@k" in capsys.readouterr().err


def test_eval_reports_perplexity_and_agreement(model_dir, tmp_path):
    exact_out, spec_out = tmp_path / "exact.json", tmp_path / "spec.json"
    assert main(["eval", "--model", str(model_dir), "--chunks", "2", "--expert-cache", "50%",
                 "--prefetch", "lookahead", "--compare-exact", "--out", str(exact_out)]) == 0
    exact = json.loads(exact_out.read_text())
    assert exact["top1_agreement"] == 1.0 and exact["delta_perplexity"] == pytest.approx(0, abs=1e-3)
    assert 1 < exact["perplexity"] < 1000
    assert main(["eval", "--model", str(model_dir), "--chunks", "2", "--expert-cache", "50%",
                 "--prefetch", "lookahead", "--speculative-execution", "on", "--out", str(spec_out)]) == 0
    spec = json.loads(spec_out.read_text())
    assert spec["top1_agreement"] < 1.0 and 0 < spec["speculation"]["depth 1"]["recall_at_k"] < 1


def test_simulate_projects_from_a_trace(model_dir, tmp_path):
    routes, out = tmp_path / "r.npz", tmp_path / "sim.json"
    assert main(["trace", "--model", str(model_dir), "--out", str(routes), "--tokens", "512",
                 "--prefetch", "lookahead"]) == 0
    assert main(["simulate", "--routes", str(routes), "--shape", "mixtral-8x7b", "--layers", "4",
                 "--hardware", "h100-pcie5", "--batch-sizes", "1,4", "--steps", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"25% batch 1", "25% batch 4", "50% batch 1", "50% batch 4"}
    assert main(["simulate", "--routes", str(routes), "--hardware", "tpu-v9"]) == 2


@pytest.mark.parametrize("command", ["generate", "serve", "bench", "simulate", "eval", "trace", "calibrate",
                                     "fit-estimator", "parallel-bench"])
def test_every_subcommand_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "--model" in capsys.readouterr().out


def test_boolean_engine_flags_reach_the_engine(model_dir, capfd):
    """--direct-io is a switch (--no-direct-io its negation), not a value the config would refuse."""
    args = ["generate", "--model", str(model_dir), "--prompt", "a", "--max-new-tokens", "2", "--expert-cache", "50%",
            "--expert-tier", "disk"]
    assert main(args + ["--direct-io"]) == 0
    assert "direct I/O" in capfd.readouterr().err
    assert main(args + ["--no-direct-io"]) == 0
    assert "direct I/O" not in capfd.readouterr().err
