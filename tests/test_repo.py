"""The feature repo: loading, declarations, errors, and encoder versions."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factlog import FactTypeCatalog
from timetravel_api import FeatureRepo, encoder
from timetravel_api._errors import EncoderDefinitionError, RepoError
from timetravel_api._features import parse_features
from ttstore import Store

FIXTURE = Path(__file__).parent / "fixtures" / "feature_repo.py"
ROOT = Path(__file__).parent.parent

HEADER = """\
from factlog import FactType
from snapshotter import ServiceConfig
from timetravel_api import encoder, facts, snapshot

play = FactType("play", entity=("member_id", "int64"), fields={"seconds": "float64"},
                lookback="10d")
"""


def write(tmp_path: Path, body: str, name: str = "repo.py") -> Path:
    p = tmp_path / name
    p.write_text(HEADER + textwrap.dedent(body))
    return p


def test_fixture_repo_declarations() -> None:
    repo = FeatureRepo.load(FIXTURE)
    assert list(repo.fact_types) == ["playback", "search", "rating"]
    assert list(repo.services) == ["viewing_history", "profile"]
    assert repo.services["profile"].max_staleness == "24h"
    assert list(repo.encoders) == ["minutes_7d", "distinct_videos_1d", "last_query",
                                   "mean_stars_30d", "history_plus_today"]
    mins = repo.encoders["minutes_7d"]
    assert mins.entity_type == "int64" and mins.fact_fed and mins.batch_fn is not None
    assert [(i.fact_type, i.window, i.span_us) for i in mins.fact_inputs] == [
        ("playback", "7d", 7 * 86_400_000_000)]
    # search has a 3d lookback: an unwindowed input reads that far back
    assert repo.encoders["last_query"].fact_inputs[0].span_us == 3 * 86_400_000_000
    assert repo.encoders["distinct_videos_1d"].max_span_us() == 3 * 86_400_000_000
    assert repo.encoders["history_plus_today"].services == ("viewing_history",)
    assert not repo.encoders["history_plus_today"].fact_fed


def test_dotted_module_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    by_path = FeatureRepo.load(FIXTURE)
    by_module = FeatureRepo.load("tests.fixtures.feature_repo")
    assert by_module.versions == by_path.versions
    monkeypatch.setenv("TIMETRAVEL_REPO", str(FIXTURE))
    assert FeatureRepo.load().versions == by_path.versions
    monkeypatch.delenv("TIMETRAVEL_REPO")
    with pytest.raises(RepoError) as info:
        FeatureRepo.load()
    assert info.value.code == "repo_not_found"


def test_encoders_parse_as_features() -> None:
    repo = FeatureRepo.load(FIXTURE)
    specs = parse_features(["minutes_7d", "playback.seconds.sum.7d"],
                           fact_types=repo.fact_types, services=repo.services,
                           encoders=repo.encoders)
    assert specs[0].kind == "encoder" and specs[0].encoder is repo.encoders["minutes_7d"]
    assert str(specs[0].output_type) == "double" and specs[0].entity_type == "int64"
    assert specs[1].kind == "fact_field"


def test_not_found(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "nope.py"), "no_such_module_xyz.repo"):
        with pytest.raises(RepoError) as info:
            FeatureRepo.load(missing)
        assert info.value.code == "repo_not_found"
        assert missing in info.value.message


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "x = 1\ndef broken(:\n    pass\n")
    with pytest.raises(RepoError) as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_syntax_error"
    line = HEADER.count("\n") + 2
    assert f"{p}, line {line}" in info.value.message
    assert "\n" not in info.value.message


def test_import_error_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "x = 1\ny = 1 / 0\n")
    with pytest.raises(RepoError) as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_import_error"
    assert f"{p}, line {HEADER.count(chr(10)) + 2}" in info.value.message
    assert "ZeroDivisionError" in info.value.message


def test_bad_encoder_declaration_is_an_import_error(tmp_path: Path) -> None:
    p = write(tmp_path, """
        @encoder(inputs=[facts("play", window="7x")])
        def bad(view):
            return 1
    """)
    with pytest.raises(RepoError) as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_import_error"
    assert "malformed window '7x'" in info.value.message


def test_duplicate_and_clashing_names(tmp_path: Path) -> None:
    p = write(tmp_path, """
        play2 = FactType("play", entity=("member_id", "int64"), fields={"x": "int64"})
    """)
    with pytest.raises(RepoError) as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_duplicate_name" and "'play'" in info.value.message
    # the same declaration under two names is one declaration
    assert list(FeatureRepo.load(write(tmp_path, "again = play\n", "ok.py")).fact_types) == [
        "play"]
    p = write(tmp_path, """
        @encoder(inputs=[facts("play")], name="play")
        def f(view):
            return 1
    """, "clash.py")
    with pytest.raises(RepoError) as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_duplicate_name" and "fact type" in info.value.message
    p = write(tmp_path, """
        @encoder(inputs=[facts("play")], name="snapshot")
        def f(view):
            return 1
    """, "clash2.py")
    with pytest.raises(RepoError, match="snapshot prefix"):
        FeatureRepo.load(p)
    p = write(tmp_path, """
        @encoder(inputs=[facts("play")])
        def f(view):
            return 1
        g = f
        @encoder(inputs=[facts("play")], name="f")
        def other(view):
            return 2
    """, "dup.py")
    with pytest.raises(RepoError) as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_duplicate_name" and "encoder 'f'" in info.value.message


def test_dotted_encoder_names_are_rejected() -> None:
    with pytest.raises(EncoderDefinitionError):
        encoder(inputs=[], name="play.seconds.sum.7d")(lambda v: 1)


def test_unknown_inputs_and_mixed_entity_types(tmp_path: Path) -> None:
    p = write(tmp_path, """
        @encoder(inputs=[facts("nope")])
        def f(view):
            return 1
    """)
    with pytest.raises(RepoError, match="unknown fact type 'nope'") as info:
        FeatureRepo.load(p)
    assert info.value.code == "repo_invalid"
    p = write(tmp_path, """
        svc = ServiceConfig(name="prof", url="http://127.0.0.1:9/{entity_id}",
                            entity_type="string")
        @encoder(inputs=[facts("play"), snapshot("prof")])
        def f(view):
            return 1
    """, "mixed.py")
    with pytest.raises(RepoError, match="different entity key types"):
        FeatureRepo.load(p)


def test_services_dict_unknown_key(tmp_path: Path) -> None:
    p = write(tmp_path, """
        services = {"prof": {"url": "http://127.0.0.1:9/{entity_id}", "colour": "red"}}
    """)
    with pytest.raises(RepoError, match="unknown key 'colour'"):
        FeatureRepo.load(p)


ENC_A = """
@encoder(inputs=[facts("play", window="7d")], output="float64")
def total(view):
    return sum(f["seconds"] for f in view.facts("play"))

@encoder(inputs=[facts("play")], output="int64")
def n(view):
    return len(view.facts("play"))
"""


def test_version_changes_with_the_code(tmp_path: Path) -> None:
    a = FeatureRepo.load(write(tmp_path, ENC_A, "a.py")).versions
    same = FeatureRepo.load(write(tmp_path, ENC_A, "a_copy.py")).versions
    assert same == a  # the same code in another file: the same versions
    changed = ENC_A.replace('sum(f["seconds"]', 'sum(2 * f["seconds"]')
    b = FeatureRepo.load(write(tmp_path, changed, "b.py")).versions
    assert b["total"] != a["total"]
    # n's code did not change, but the module that defines it did
    assert b["n"] != a["n"]
    window = ENC_A.replace('window="7d"', 'window="8d"')
    assert FeatureRepo.load(write(tmp_path, window, "c.py")).versions["total"] != a["total"]
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in a.values())


def test_version_stable_across_processes(tmp_path: Path) -> None:
    p = write(tmp_path, ENC_A + "\nNAMES = frozenset({'a', 'b', 'c', 'd'})\n", "stable.py")
    here = FeatureRepo.load(p).versions
    code = ("import json, sys; from timetravel_api import FeatureRepo; "
            "print(json.dumps(FeatureRepo.load(sys.argv[1]).versions))")
    outs = set()
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True,
                             text=True, check=True, cwd=ROOT,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"})
        outs.add(out.stdout.strip())
    import json

    assert [json.loads(o) for o in outs] == [here]


def test_bytecode_version_without_source() -> None:
    ns: dict[str, object] = {}
    exec(compile("def f(view):\n    return {'a', 'b'}\n", "<none>", "exec"), ns)  # noqa: S102
    e1 = encoder(inputs=[], entity_type="int64")(ns["f"])  # type: ignore[arg-type]
    exec(compile("def f(view):\n    return {'a', 'c'}\n", "<none>", "exec"), ns)  # noqa: S102
    e2 = encoder(inputs=[], entity_type="int64")(ns["f"])  # type: ignore[arg-type]
    assert e1.version != e2.version


def test_encoders_pickle_by_repo_source(tmp_path: Path) -> None:
    import pickle

    p = write(tmp_path, ENC_A, "pick.py")
    enc = FeatureRepo.load(p).encoders["n"]
    back = pickle.loads(pickle.dumps(enc))
    assert back.name == "n" and back.version == enc.version and back.repo_source == str(p)
    # a fresh process (as a spawned worker or a Spark executor) rebuilds it from the file
    code = ("import pickle, sys; from timetravel_api import View; "
            "enc = pickle.loads(sys.stdin.buffer.read()); "
            "print(enc.version, enc.evaluate(View.live(1, 10**15, facts={'play': [{}, {}]})))")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(enc),
                         capture_output=True, check=True, cwd=ROOT)
    assert out.stdout.decode().split() == [enc.version, "(2,", "'ok')"]
    # a worker that finds other code under that path refuses, rather than run other code
    p.write_text(p.read_text() + "\n# changed\n")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(enc),
                         capture_output=True, cwd=ROOT)
    assert out.returncode != 0 and b"the repo changed" in out.stderr


def test_declare_fact_types_in_the_store(local_store: Store) -> None:
    repo = FeatureRepo.load(FIXTURE)
    first = repo.declare(local_store)
    assert [(d.fact_type.name, d.version, d.created) for d in first] == [
        ("playback", 1, True), ("search", 1, True), ("rating", 1, True)]
    assert [d.created for d in repo.declare(local_store)] == [False] * 3
    assert FactTypeCatalog(local_store).get("search").lookback == "3d"


def test_module_level_encoders_pickle_by_reference() -> None:
    import pickle

    from tests.fixtures import feature_repo

    enc = feature_repo.minutes_7d
    saved, enc.repo_source = enc.repo_source, None  # as if imported, not loaded as a repo
    try:
        assert pickle.loads(pickle.dumps(enc)) is enc
    finally:
        enc.repo_source = saved
