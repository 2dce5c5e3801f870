"""CLI behaviour that needs no Ray: argument and input errors, and the variants table."""

import sys

import pytest

from gearbox.compression import ModelRecord, ModelRepository
from gearbox.serving.cli import main
from tests.unit.tiny_model import CONV_SIGNATURE, MODULE, linear_onnx, make_manifest, make_record


@pytest.fixture(autouse=True)
def restore_sys_path(monkeypatch):
    # main() may put the working directory on sys.path; keep that local to each test.
    monkeypatch.setattr(sys, "path", list(sys.path))


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def assert_one_error_line(lines, *fragments):
    assert len(lines) == 1, lines
    [line] = lines
    assert line.startswith("gearbox: error: ")
    for fragment in fragments:
        assert fragment in line
    return line


def test_unimportable_spec_is_one_error_line(tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run(capsys, "compress", "--spec", "no_such_module:spec", "--repo", str(repo))
    assert code == 1
    assert out == ""
    assert_one_error_line(err, "'no_such_module:spec'", "No module named 'no_such_module'")
    assert not repo.exists()


def test_spec_that_is_not_a_model_spec_is_one_error_line(tmp_path, capsys):
    path = f"{MODULE}:not_a_spec"
    code, _, err = run(capsys, "compress", "--spec", path, "--repo", str(tmp_path / "repo"))
    assert code == 1
    assert_one_error_line(err, path, "not a gearbox ModelSpec")


def test_unknown_variant_is_one_error_line_naming_it(tmp_path, capsys):
    repo = tmp_path / "repo"
    code, out, err = run(
        capsys,
        "compress",
        "--example",
        "digits",
        "--variants",
        "fp32,nope",
        "--repo",
        str(repo),
    )
    assert code == 1
    assert out == ""
    line = assert_one_error_line(err, "'nope'", "known: fp32, int8, pruned, distilled")
    assert "'fp32'" not in line
    assert not repo.exists()


def test_unwritable_repository_is_one_error_line_and_creates_nothing(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("in the way")
    repo = blocker / "repo"
    code, out, err = run(capsys, "compress", "--spec", f"{MODULE}:conv_spec", "--repo", str(repo))
    assert code == 1
    assert out == ""
    assert_one_error_line(err, str(repo), "not writable")
    assert blocker.read_text() == "in the way"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("value", ["2", "-0.1", "lots"])
def test_max_accuracy_drop_outside_zero_to_one_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "compress",
                "--example",
                "digits",
                "--repo",
                str(tmp_path / "repo"),
                "--max-accuracy-drop",
                value,
            ]
        )
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gearbox compress")
    assert "--max-accuracy-drop" in err
    assert not (tmp_path / "repo").exists()


def test_compress_needs_a_model_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["compress", "--repo", str(tmp_path)])
    assert caught.value.code == 2
    assert "one of the arguments --example --spec is required" in capsys.readouterr().err


def test_variants_of_a_missing_repository_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    code, out, err = run(capsys, "variants", "--repo", str(missing))
    assert code == 1
    assert out == ""
    assert_one_error_line(err, str(missing), "does not exist")
    assert not missing.exists()


def build_repository(root):
    repository = ModelRepository(root)
    repository.ensure_writable()
    repository.register_model(
        ModelRecord(
            name="tiny",
            signature=CONV_SIGNATURE,
            task="classification",
            metric="accuracy",
            reference_variant="fp32",
        )
    )
    fp32, int8 = linear_onnx(seed=0), linear_onnx(seed=1)
    repository.publish_variant(make_manifest(fp32, param_count=650), fp32)
    repository.publish_variant(
        make_manifest(
            int8,
            variant="int8",
            technique="quantize",
            parent="fp32",
            status="rejected",
            reason="accuracy 0.5000 is 0.4000 below the reference 0.9000",
        ),
        int8,
    )
    return repository


def test_variants_of_an_unknown_model_is_one_error_line(tmp_path, capsys):
    build_repository(tmp_path)
    code, out, err = run(capsys, "variants", "--repo", str(tmp_path), "other")
    assert code == 1
    assert out == ""
    assert_one_error_line(err, "model 'other' not found")


def test_variants_prints_the_table(tmp_path, capsys):
    build_repository(tmp_path)
    code, out, err = run(capsys, "variants", "--repo", str(tmp_path))
    assert code == 0
    assert err == []
    assert "model tiny" in out
    for column in ("variant", "technique", "status", "size", "params", "accuracy", "agreement"):
        assert column in out
    assert "cpu b1 ms" in out
    assert "cpu b8 ms" in out
    fp32_row = next(line for line in out.splitlines() if " fp32 " in line)
    for cell in ("export", "ready", "0.7 k", "0.9000", "0.9700", "0.100/0.200", "0.300/0.400"):
        assert cell in fp32_row
    int8_row = next(line for line in out.splitlines() if " int8 " in line)
    assert "quantize" in int8_row
    assert "rejected" in int8_row
    assert "int8: rejected: accuracy 0.5000 is 0.4000 below the reference 0.9000" in out


def test_variants_of_one_model(tmp_path, capsys):
    build_repository(tmp_path)
    code, out, _ = run(capsys, "variants", "--repo", str(tmp_path), "tiny")
    assert code == 0
    assert "model tiny" in out
    assert " int8 " in out


def test_variants_of_an_empty_repository_says_so(tmp_path, capsys):
    code, out, err = run(capsys, "variants", "--repo", str(tmp_path))
    assert code == 0
    assert out == ""
    # rich wraps stderr at 80 columns when it is not a terminal; compare the words only
    assert "holds no models" in " ".join(" ".join(err).split())


def test_variants_shows_a_stored_column_only_where_storage_differs(tmp_path, capsys):
    repository = build_repository(tmp_path)
    code, out, _ = run(capsys, "variants", "--repo", str(tmp_path))
    assert code == 0 and "stored" not in out
    clustered = linear_onnx(seed=2)
    repository.publish_variant(
        make_manifest(
            clustered,
            variant="clustered",
            technique="cluster",
            parent="fp32",
            storage_bytes=123,
        ),
        clustered,
    )
    code, out, _ = run(capsys, "variants", "--repo", str(tmp_path))
    assert code == 0 and "stored" in out
    row = next(line for line in out.splitlines() if " clustered " in line)
    assert "123 B" in row


def test_variants_plot_writes_a_png_of_the_model(tmp_path, capsys):
    build_repository(tmp_path / "repo")
    plot = tmp_path / "front.png"
    code, out, err = run(capsys, "variants", "--repo", str(tmp_path / "repo"), "--plot", str(plot))
    assert code == 0, err
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"plot of tiny's variants written to {plot}" in out


def test_variants_plot_of_several_models_asks_for_one(tmp_path, capsys):
    repository = build_repository(tmp_path / "repo")
    repository.register_model(make_record("other"))
    code, _out, err = run(
        capsys, "variants", "--repo", str(tmp_path / "repo"), "--plot", str(tmp_path / "x.png")
    )
    assert code == 1
    assert_one_error_line(err, "--plot draws one model; name one of other, tiny")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "distilled.epoch=3"], "has no parameter 'epoch'"),
        (["--set", "pruned.amount=0.3"], "variant 'pruned' is not being built"),
        (["--variants", "int8", "--search"], "--search chooses its own candidates"),
        (["--recipe", "missing.yaml"], "cannot read recipe file missing.yaml"),
    ],
)
def test_bad_recipe_choices_are_one_error_line_before_anything_runs(
    tmp_path, capsys, monkeypatch, extra, message
):
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "repo"
    variants = [] if "--variants" in extra else ["--variants", "distilled"]
    code, out, err = run(
        capsys, "compress", "--example", "digits", "--repo", str(repo), *variants, *extra
    )
    assert code == 1
    assert out == ""
    assert_one_error_line(err, message)
    assert not repo.exists()


@pytest.mark.parametrize("value", ["20", "-1", "high"])
def test_a_niceness_outside_0_to_19_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--repo", str(tmp_path), "--standard-niceness", value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: gearbox serve")
    assert "--standard-niceness" in err


def test_serve_options_reach_the_batching_config(tmp_path):
    from gearbox.serving.cli import _gateway_config, _parser

    default = _gateway_config(_parser().parse_args(["serve", "--repo", str(tmp_path)]))
    assert default.batching.priority_lane is True
    assert default.batching.standard_niceness == 10
    args = ["serve", "--repo", str(tmp_path), "--no-priority-lane", "--standard-niceness", "3"]
    chosen = _gateway_config(_parser().parse_args(args))
    assert chosen.batching.priority_lane is False
    assert chosen.batching.standard_niceness == 3


def test_version_names_the_installed_distribution(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"gearbox {version('gearbox')}"


def test_every_option_of_every_command_has_help_text():
    from gearbox.serving.cli import _parser

    def walk(parser, path):
        for action in parser._actions:
            if action.dest in ("help", "version"):
                continue
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):  # subcommands
                for name, sub in choices.items():
                    yield from walk(sub, [*path, name])
            elif action.option_strings or action.dest:
                yield " ".join(path), action

    options = [(w, a) for w, a in walk(_parser(), ["gearbox"]) if a.option_strings]
    missing = [f"{w}: {a.option_strings[0]}" for w, a in options if not a.help]
    assert not missing, missing
    # An option with a value to take says what it is when not given.
    silent = [
        f"{w}: {a.option_strings[0]}"
        for w, a in options
        if a.nargs != 0 and a.default not in (None, (), [], False) and "default" not in a.help
    ]
    assert not silent, silent
