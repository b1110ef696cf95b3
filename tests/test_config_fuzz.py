"""Malformed configurations: each one is one line on stderr and exit code 2;
valid ones are read exactly and resume as themselves."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mogvae.cli import main
from mogvae.config.files import dotted_fields
from mogvae.runs.run import RunConfig, RunDir, RunError, load_run_config

BAD_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "-0.5", "1e400", '"abc"', "[1, 2]", "{a = 1}",
                               "true"])
INVALID = {  # field -> values that must be refused
    "seeds": BAD_NUMBERS, "base_seed": st.sampled_from(["-1", "nan", '"x"', "1.5"]),
    "checkpoint_every": BAD_NUMBERS, "preset": st.sampled_from(['"vamp"', "3", '""']),
    "model.n_components": BAD_NUMBERS, "model.latent_dim": BAD_NUMBERS,
    "model.hidden": st.sampled_from(["[]", "[0]", "[-3]", '"64"', "[64, 1e9]", "[1.5]"]),
    "model.activation": st.sampled_from(['"gelu"', "1"]), "model.prior": st.sampled_from(['"flow"', "[]"]),
    "model.posterior": st.sampled_from(['"planar"', '""']),
    "data.sigma": BAD_NUMBERS, "data.n_train": BAD_NUMBERS, "data.name": st.sampled_from(['"mnist"', "3"]),
    "train.lr": BAD_NUMBERS, "train.epochs": BAD_NUMBERS, "train.batch_size": BAD_NUMBERS,
    "train.final_lr_factor": BAD_NUMBERS, "train.on_divergence": st.sampled_from(['"ignore"', "0"]),
    "train.max_retries": st.sampled_from(["-1", "nan", "1e6"]),
    "eval.grid_size": st.sampled_from(["2000", "10", "nan", "-5"]), "eval.grid_span": BAD_NUMBERS,
}
SECTIONS = ["", "model.", "data.", "train.", "eval."]


# small sizes under every case: a configuration that is wrongly accepted trains in a second and fails the test
BASE = {"seeds": "1", "data.n_train": "100", "data.n_val": "50", "data.n_test": "50", "train.epochs": "1",
        "eval.grid_size": "101", "eval.n_generated": "100", "model.hidden": "[4]"}


def toml_text(assignments: dict[str, str]) -> str:
    assignments = {**BASE, **assignments}
    top = [f"{k} = {v}" for k, v in assignments.items() if "." not in k]
    lines = top[:]
    for section in ("model", "data", "train", "eval"):
        keys = {k.split(".", 1)[1]: v for k, v in assignments.items() if k.startswith(section + ".")}
        if keys:
            lines.append(f"[{section}]")
            lines += [f"{k} = {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@st.composite
def malformed(draw):
    kind = draw(st.sampled_from(["invalid value", "unknown key", "broken toml", "bad override"]))
    if kind == "invalid value":
        field = draw(st.sampled_from(sorted(INVALID)))
        return toml_text({field: draw(INVALID[field])}), []
    if kind == "unknown key":
        name = draw(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
        section = draw(st.sampled_from(SECTIONS))
        known = {key.rsplit(".", 1)[-1] for key in dotted_fields(RunConfig)}
        if name in known:
            name = name + "_x"
        return toml_text({section + name: "1"}), []
    if kind == "broken toml":
        return draw(st.sampled_from(["seeds = ", "[train\nlr=1", "seeds = 1\nseeds = 2", "= 3", "[model]\nhidden = [1,"])), []
    field = draw(st.sampled_from(sorted(INVALID)))
    return toml_text({}), [f"{field}={draw(INVALID[field])}"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed())
def test_malformed_configurations_exit_2_with_one_line(case, tmp_path_factory, capsys):
    text, overrides = case
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "c.toml"
    path.write_text(text)
    args = ["train", str(path), "--out", str(tmp / "out")]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (text, overrides)
    assert len(err) == 1 and err[0].startswith("mogvae: error:") and "Traceback" not in err[0], err
    assert not (tmp / "out" / "checkpoints").exists()


finite = st.floats(min_value=1e-6, max_value=0.5, allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds=st.integers(1, 50), lr=finite, sigma=st.floats(0.01, 2.0), hidden=st.lists(st.integers(1, 256), min_size=1,
       max_size=4), preset=st.sampled_from([None, "mfg", "mog-prior", "mog-posterior", "mog-both"]),
       grid=st.integers(50, 3000).map(lambda n: 2 * n + 1))
def test_a_valid_configuration_is_read_exactly_and_resumes_as_itself(seeds, lr, sigma, hidden, preset, grid,
                                                                    tmp_path_factory):
    """mogvae's own path: TOML text -> load_run_config -> the run folder's config.json
    -> the resume check. A value that changed on the way (a float re-rounded, a
    list that came back a tuple) would make a run refuse its own resume."""
    tmp = tmp_path_factory.mktemp("valid")
    path = tmp / "c.toml"
    path.write_text(toml_text({"seeds": str(seeds), "train.lr": repr(lr), "data.sigma": repr(sigma),
                               "model.hidden": str(hidden), "eval.grid_size": str(grid),
                               **({"preset": f'"{preset}"'} if preset else {})}))
    config = load_run_config(path, [])
    assert config.seeds == seeds and config.train.lr == lr and config.data.sigma == sigma
    assert config.model.hidden == tuple(hidden) and config.eval.grid_size == grid and config.preset == preset
    first, again = RunDir(tmp / "out"), RunDir(tmp / "out")
    first.claim(config)
    again.claim(load_run_config(path, []))                   # raises RunError if anything differs
    assert again.config_hash == first.config_hash
    with pytest.raises(RunError, match="train.lr"):
        RunDir(tmp / "out").claim(load_run_config(path, [f"train.lr={lr * 0.5!r}"]))
