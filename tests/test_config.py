"""Engine options: validated config objects, one vocabulary for API and CLI, registries that match."""

from dataclasses import fields
from typing import Literal

import pytest

from moespec import LLM, EngineConfig, MoespecError, OffloadConfig, SpeculationConfig
from moespec.cli import build_parser
from moespec.config import option_fields, registry
from moespec.experts.eviction import POLICIES
from moespec.speculate import PREDICTORS
from tiny import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    save_model("qwen2_moe", d, experts=8, top_k=2, num_hidden_layers=2)
    return d


@pytest.mark.parametrize("options,message", [
    (dict(eviction="mru"), "eviction must be one of lru, lfu, lfru, pinned_hot, predicted, got 'mru'"),
    (dict(expert_cache="200%"), "expert_cache must be a share in (0%, 100%]"),
    (dict(expert_cache=0), "got 0"),
    (dict(link_bandwidth="0GB/s"), "link_bandwidth must be a positive rate like '25GB/s', got '0GB/s'"),
    (dict(lookahead_depth=0), "lookahead_depth must be an integer >= 1, got 0"),
    (dict(lookahead_depth="2"), "lookahead_depth must be an integer >= 1, got '2'"),
    (dict(speculative_execution="on"), "needs a speculating prefetch policy"),
    (dict(gamma=-1), "gamma must be an integer >= 0, got -1"),
    (dict(prefetch_threshold=1.5), "prefetch_threshold must be a number in [0, 1], got 1.5"),
    (dict(draft_affinity="names"), "draft_affinity must be one of weights, outputs, router, got 'names'"),
    (dict(dtype="int3"), "dtype must be one of float32, bfloat16, float16, got 'int3'"),
    (dict(device="cuda", link_bandwidth="1GB/s"), "is emulation for CPU runs"),
    (dict(expert_cahce="25%"), "unknown engine option 'expert_cahce'"),
])
def test_bad_options_are_one_line_errors_naming_field_and_value(options, message):
    with pytest.raises(MoespecError) as err:
        EngineConfig.build(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_keywords_are_shorthand_for_the_config(model_dir):
    cfg = EngineConfig(offload=OffloadConfig(expert_cache="25%", eviction="lfu"),
                       speculation=SpeculationConfig(prefetch="lookahead", speculative_execution=True))
    assert cfg.speculation.speculative_execution == "on"  # the boolean alias, normalised
    assert EngineConfig.build(expert_cache="25%", eviction="lfu", prefetch="lookahead",
                              speculative_execution="on") == cfg
    a, b = LLM(model_dir, config=cfg), LLM(model_dir, expert_cache="25%", eviction="lfu", prefetch="lookahead",
                                           speculative_execution=True)
    assert a.config == b.config and a.experts.capacity == b.experts.capacity == 4
    c = LLM(model_dir, config=cfg, expert_cache="50%")  # keywords replace the config's values
    assert c.config.offload.expert_cache == "50%" and c.config.offload.eviction == "lfu"
    assert c.config.as_dict()["expert_cache"] == "50%" and c.config.as_dict()["prefetch"] == "lookahead"
    for llm in (a, b, c):
        llm.close()


def test_registries_match_their_literals():
    assert set(POLICIES) == {"lru", "lfu", "lfru", "pinned_hot", "predicted"}
    assert set(PREDICTORS) == {"none", "lookahead", "estimator", "auto"}
    with pytest.raises(TypeError, match="does not match its Literal"):
        registry(Literal["a", "b"], {"a": object})


def test_every_option_is_a_cli_flag_with_the_same_values():
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "x", "--expert-cache", "12", "--speculative-execution", "on",
                              "--prefetch", "lookahead", "--gamma", "3", "--draft-policy", "random",
                              "--prefetch-threshold", "0.25"])
    from moespec.cli import _engine_options

    cfg = EngineConfig.build(**_engine_options(args))
    assert cfg.offload.expert_cache == 12 and cfg.speculation.speculative_execution == "on"
    assert cfg.specdecode.gamma == 3 and cfg.specdecode.draft_policy == "random"
    assert cfg.speculation.prefetch_threshold == 0.25
    names = {f.name for _, f in option_fields()}
    for sub in ("generate", "serve", "bench", "eval"):
        flags = {a.dest for a in parser._subparsers._group_actions[0].choices[sub]._actions}
        assert names <= flags, (sub, names - flags)
    assert {f.name for f in fields(OffloadConfig)} <= names
    with pytest.raises(SystemExit):  # a choice outside the Literal is refused by the parser itself
        parser.parse_args(["generate", "--prompt", "x", "--eviction", "mru"])
