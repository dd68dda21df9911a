"""instrument.report: every format, rendered from one store that holds every leak class,
a timeout and a writer that died mid-batch, recorded from real workloads on SQLite and
PostgreSQL; the JSON is validated against instrument/report_schema.json."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import sqlalchemy as sa
from conftest import PG_URL, require_postgres
from report_workloads import (
    LEAK_AFTER,
    run_dies_mid_batch,
    run_exiting_leak,
    run_killed,
    run_mixed,
)

import instrument
from instrument import analysis, report

SCHEMA = json.loads((Path(instrument.__file__).parent / "report_schema.json").read_text())
DATABASES = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


def fn(site: str) -> str:
    return site.rsplit(" in ", 1)[1]


def md_escaped(text: str) -> str:
    """``text`` with the characters markdown gives a meaning to backslash-escaped."""
    return re.sub(r"([\\`*_\[\]<>|~#&])", r"\\\1", text)


@pytest.fixture(scope="module", params=DATABASES)
def rendered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    """One store with the mixed workload (this process, still running) and three child
    processes (exited with a connection open, killed, died mid-batch), in every format."""
    directory = tmp_path_factory.mktemp("report")
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'app.db'}"
    else:
        require_postgres()
        url = PG_URL
    store = directory / "poolscope.db"
    assert run_exiting_leak(directory, url, store).returncode == 0
    assert run_killed(directory, url, store) == -9
    assert run_dies_mid_batch(directory, url, store) == -9
    work = run_mixed(url, store)
    try:
        # Rendered from one report, so an open checkout's growing hold is the same in all.
        text, data = report.make_report(store, fmt="json")
        conn = analysis.open_store(store)
        yield SimpleNamespace(
            store=store,
            work=work,
            text=report.render(data, "text"),
            markdown=report.render(data, "markdown"),
            html=report.render(data, "html"),
            json=json.loads(text),
            data=data,
            percentiles=analysis.percentiles(conn, by="pool").set_index("pool"),
        )
        conn.close()
    finally:
        work.close()


class TestJson:
    def test_valid_against_the_shipped_schema(self, rendered: SimpleNamespace) -> None:
        """The JSON output validates against report_schema.json, which is itself valid."""
        jsonschema.Draft202012Validator.check_schema(SCHEMA)
        jsonschema.validate(rendered.json, SCHEMA, cls=jsonschema.Draft202012Validator)
        assert rendered.json["schema"] == "poolscope.report/1"
        assert rendered.json == json.loads(json.dumps(rendered.data))

    def test_typed_model_names_the_schema_keys(self) -> None:
        """Each TypedDict of ``analysis.Report`` has the keys of its object in the schema,
        with the same ones required, so code written against the types reads real reports."""
        from instrument.analysis import _model

        defs = SCHEMA["$defs"]
        props = SCHEMA["properties"]
        pairs = [
            (analysis.Report, SCHEMA),
            (_model.ReportFilters, props["filters"]),
            (_model.Summary, props["summary"]),
            (_model.ProcessEntry, props["processes"]["items"]),
            (_model.PoolEntry, props["pools"]["items"]),
            (_model.MsStats, defs["ms_stats"]),
            (_model.Sizing, defs["sizing"]),
            (_model.Replay, defs["replay"]),
            (_model.ReplayOutcome, defs["replay_outcome"]),
            (_model.Recycle, defs["recycle"]),
            (_model.PrePingCost, defs["recycle"]["properties"]["pre_ping_cost"]),
            (_model.LeakEntry, props["leaks"]["items"]),
            (_model.TimeoutEntry, props["timeouts"]["items"]),
            (_model.Holder, props["timeouts"]["items"]["properties"]["holders"]["items"]),
            (_model.SiteEntry, props["sites"]["items"]),
            (_model.SiteHoldMs, props["sites"]["items"]["properties"]["hold_ms"]),
            (_model.SiteWaitMs, props["sites"]["items"]["properties"]["wait_ms"]),
            (_model.UtilizationSeries, props["utilization"]["items"]),
            (_model.Diagnosis, defs["diagnosis"]),
            (_model.ServerView, defs["diagnosis"]["properties"]["server"]["oneOf"][1]),
            (_model.Blocker, defs["diagnosis"]["properties"]["blocked_by"]["items"]),
            (_model.Source, props["source"]),
        ]
        for typed, obj in pairs:
            assert set(typed.__annotations__) == set(obj["properties"]), typed.__name__
            required = set(obj["required"])
            assert required <= typed.__required_keys__, typed.__name__
            assert typed.__required_keys__ - required <= {"ignored_events"}, typed.__name__

    def test_summary_counts_what_the_workloads_did(self, rendered: SimpleNamespace) -> None:
        """14 checkouts in this process and 11 committed by the children; one timeout; two
        confirmed leaks (GC, open at exit), three suspected, one unknown (killed)."""
        s = rendered.json["summary"]
        assert {k: s[k] for k in (
            "processes", "crashed_processes", "running_processes", "pools", "checkouts",
            "timeouts", "confirmed_leaks", "suspected_leaks", "unknown_leaks", "dropped",
        )} == {
            "processes": 4, "crashed_processes": 2, "running_processes": 1, "pools": 2,
            "checkouts": rendered.work.quick + 4 + 11, "timeouts": 1, "confirmed_leaks": 2,
            "suspected_leaks": 3, "unknown_leaks": 1, "dropped": 0,
        }  # fmt: skip
        states = [p["state"] for p in rendered.json["processes"]]
        assert states == ["exited", "crashed", "crashed", "running"]

    def test_every_leak_class_with_its_site(self, rendered: SimpleNamespace) -> None:
        leaks = {(x["class"], fn(x["site"]), x["count"], x["certainty"]) for x in
                 rendered.json["leaks"]}  # fmt: skip
        assert leaks == {
            ("never_returned", "keep_until_exit", 1, "confirmed"),
            ("gc_reclaimed", "forget_to_close", 1, "confirmed"),
            ("open_at_crash", "hold_until_killed", 1, "unknown"),
            ("held_too_long", "hold_first", 1, "suspected"),
            ("held_too_long", "hold_second", 1, "suspected"),
            ("open_now", "keep_open_now", 1, "suspected"),
        }
        classes = [x["class"] for x in rendered.json["leaks"]]
        assert classes[:2] == ["never_returned", "gc_reclaimed"]  # confirmed first
        for leak in rendered.json["leaks"]:
            assert leak["stack"][0] == leak["site"]

    def test_pools_carry_their_percentiles_in_ms(self, rendered: SimpleNamespace) -> None:
        pools = {p["name"]: p for p in rendered.json["pools"]}
        assert set(pools) == {"mixed", "child"}
        mixed = pools["mixed"]
        assert (mixed["pool_size"], mixed["max_overflow"], mixed["capacity"]) == (2, 0, 2)
        assert (mixed["peak_in_use"], mixed["timeouts"], mixed["checkouts"]) == (2, 1, 14)
        assert mixed["leak_after_s"] == LEAK_AFTER
        assert pools["child"]["checkouts"] == 11 and pools["child"]["capacity"] == 3
        assert len(pools["child"]["processes"]) == 3
        pct = rendered.percentiles.loc["mixed"]
        for key, column in (("p50", "wait_p50_s"), ("p95", "wait_p95_s"), ("max", "wait_max_s")):
            assert mixed["wait_ms"][key] == pytest.approx(pct[column] * 1000, abs=1e-3)
        assert mixed["sizing"]["verdict"] == "too_small"
        assert pools["child"]["sizing"]["verdict"] == "ok"

    def test_timeout_lists_its_holders(self, rendered: SimpleNamespace) -> None:
        [t] = rendered.json["timeouts"]
        assert fn(t["site"]) == "wait_and_time_out"
        assert [(fn(h["site"]), h["thread"]) for h in t["holders"]] == [
            ("hold_first", "holder-1"),
            ("hold_second", "holder-2"),
        ]
        assert t["holders"][0]["held_s"] >= t["holders"][1]["held_s"] >= t["waited_s"]

    def test_sites_share_their_pool_time(self, rendered: SimpleNamespace) -> None:
        sites = rendered.json["sites"]
        for pool in ("mixed", "child"):
            shares = [s["pool_time_share"] for s in sites if s["pool"] == pool]
            assert sum(shares) == pytest.approx(1.0)
        totals = [s["total_hold_s"] for s in sites]
        assert totals == sorted(totals, reverse=True)
        quick = [s for s in sites if s["pool"] == "mixed" and fn(s["site"]) == "quick_query"]
        assert quick[0]["checkouts"] == rendered.work.quick

    def test_pool_filter_keeps_only_that_pool(self, rendered: SimpleNamespace) -> None:
        """--pool child: its 3 processes and 11 checkouts, its two leaks, no timeout."""
        _, data = report.make_report(rendered.store, analysis.Filters(pools=("child",)), fmt="json")
        s = data["summary"]
        assert (s["processes"], s["pools"], s["checkouts"], s["timeouts"]) == (3, 1, 11, 0)
        assert sorted(x["class"] for x in data["leaks"]) == ["never_returned", "open_at_crash"]
        assert [p["name"] for p in data["pools"]] == ["child"]
        assert {x["pool"] for x in data["sites"]} == {"child"}


class TestText:
    def test_leak_table_and_stacks(self, rendered: SimpleNamespace) -> None:
        """A row per leak with class, certainty, count and site, then each stack indented."""
        text = rendered.text
        assert text.startswith(f"poolscope report: {rendered.store}\n")
        assert "\nleaks: 2 confirmed, 3 suspected, 1 unknown (open at a crash)\n" in text
        assert "\ntimeouts: 1 · p95 wait: " in text
        section = text.split("\nLEAKS\n")[1].split("\nTIMEOUTS\n")[0]
        rows = [line.split() for line in section.splitlines()[1:7]]
        assert [(r[0], r[1], r[2]) for r in rows] == [
            ("never_returned", "confirmed", "1"),
            ("gc_reclaimed", "confirmed", "1"),
            ("open_at_crash", "unknown", "1"),
            ("held_too_long", "suspected", "1"),
            ("held_too_long", "suspected", "1"),
            ("open_now", "suspected", "1"),
        ]
        for leak in rendered.json["leaks"]:
            block = "\n".join(f"      {frame}" for frame in leak["stack"])
            assert block in section

    def test_timeouts_with_holders(self, rendered: SimpleNamespace) -> None:
        section = rendered.text.split("\nTIMEOUTS\n")[1].split("\nPOOLS")[0]
        # On PostgreSQL each holder is followed by its diagnosis ("why: ..."; see test_diagnose).
        lines = [line for line in section.splitlines() if not line.lstrip().startswith("why: ")]
        assert re.search(r"  pool mixed: gave up after \d+\.\d ms, 1 caller waiting$", lines[0])
        assert re.fullmatch(r"    caller: \S+ in wait_and_time_out \(thread MainThread\)", lines[1])
        assert lines[2] == "    held by 2 checkouts at that moment:"
        assert lines[3].endswith("in hold_first  (thread holder-1)")
        assert lines[4].endswith("in hold_second  (thread holder-2)")

    def test_pool_percentiles_and_sizing(self, rendered: SimpleNamespace) -> None:
        section = rendered.text.split("\nPOOLS")[1].split("\nSITES")[0]
        mixed = next(line for line in section.splitlines() if line.startswith("  mixed "))
        assert mixed.split()[:7] == ["mixed", "QueuePool", "2", "0", "2", "14", "1"]
        sizing = rendered.text.split("\nSIZING\n")[1]
        advice = {p["name"]: p["sizing"]["advice"] for p in rendered.json["pools"]}
        for sentence in advice.values():
            assert " ".join(sentence.split()) in " ".join(sizing.split())

    def test_an_empty_store_reads_as_nothing_found(self, tmp_path: Path, sqlite_url: str) -> None:
        """A pool that never checked out reports none of anything, in every format."""
        import sqlalchemy as sa

        engine = sa.create_engine(sqlite_url)
        monitor = instrument.attach(engine, store=tmp_path / "idle.db", name="idle")
        monitor.flush()
        engine.dispose()
        text, data = report.make_report(tmp_path / "idle.db")
        assert "LEAKS\n  none found" in text and "TIMEOUTS\n  none" in text
        assert data["summary"]["checkouts"] == 0
        nothing = {
            "text": ["LEAKS\n  none found\n", "TIMEOUTS\n  none\n", "no pool activity to size"],
            "markdown": [
                "## Leaks\n\nNone found.\n",
                "## Timeouts\n\nNone.\n",
                "## Sizing\n\nNo pool activity to size.\n",
            ],
            "json": ['"leaks": []', '"timeouts": []'],
            "html": ["<p>None found.</p>", "<p>None.</p>", "<p>No pool activity to size.</p>"],
        }
        assert set(nothing) == set(report.FORMATS)
        for fmt, phrases in nothing.items():
            out, data = report.make_report(tmp_path / "idle.db", fmt=fmt)
            for phrase in phrases:
                assert phrase in out, (fmt, phrase)
        jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)


class _Checker(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.external: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.external.append(value)
        if tag not in {"meta", "br", "link", "img", "input", "hr"}:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()


class TestMarkdownAndHtml:
    def test_markdown_tables_and_stacks(self, rendered: SimpleNamespace) -> None:
        md = rendered.markdown
        assert "| class | certainty | count | max held | pool | site |" in md
        for leak in rendered.json["leaks"]:
            frames = "\n".join(f"- <code>{md_escaped(frame)}</code>" for frame in leak["stack"])
            assert f"\n\n{frames}\n" in md
        assert "## Timeouts" in md and "<code>holder-1</code>" in md
        assert "| <code>mixed</code> | QueuePool | 2 | 0 | 2 | 14 | 1 |" in md

    def test_html_is_one_self_contained_page(self, rendered: SimpleNamespace) -> None:
        """No scripts, links or external references; balanced tags; text is escaped."""
        checker = _Checker()
        checker.feed(rendered.html)
        assert checker.external == []
        assert not checker.tags & {"script", "link", "img", "iframe"}
        assert checker.stack == []
        assert "<module>" not in rendered.html and "in &lt;module&gt;" in rendered.html
        for leak in rendered.json["leaks"]:
            assert f"<code>{leak['class']}</code>" in rendered.html
        assert "holder-2" in rendered.html

    def test_html_draws_connections_in_use(self, rendered: SimpleNamespace) -> None:
        """The HTML report (only it) carries utilization: one inline chart per pool, with the
        pool's capacity and its timeout; the series validate against the schema."""
        _, data = report.make_report(rendered.store, fmt="html")
        jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
        series = {s["pool"]: s for s in data["utilization"]}
        assert set(series) == {"mixed", "child"}
        assert max(series["mixed"]["in_use"]) == 2 and series["mixed"]["capacity"] == 2
        assert "utilization" not in rendered.json
        html = report.render(data, "html")
        assert html.count("<svg ") == 2
        assert 'aria-label="connections in use over time, pool mixed"' in html
        assert "capacity 2</text>" in html
        charts = dict(re.findall(r'pool (\w+)">(.*?)</svg>', html))
        assert set(charts) == {"mixed", "child"}
        # The timeout is a red line on its own pool's chart only.
        timeout_line = 'stroke="#d92d20"'
        assert (charts["mixed"].count(timeout_line), charts["child"].count(timeout_line)) == (1, 0)

    def test_html_with_many_sites(self, rendered: SimpleNamespace) -> None:
        """Thousands of sites: each gets its row, and only a site that shares its pool with
        another stack at the same line is labelled with its caller."""
        template = rendered.data["sites"][0]
        sites = [
            {**template, "site": f"app/m{i}.py:{i} in f{i}", "stack": [f"app/m{i}.py:{i} in f{i}",
             f"app/caller{i}.py:1 in c{i}"]}
            for i in range(5000)
        ]  # fmt: skip
        sites.append({**sites[7], "stack": [sites[7]["site"], "app/other.py:2 in other"]})
        html = report.render({**rendered.data, "sites": sites}, "html")
        site_labels = re.findall(r"<details><summary><code>([^<]*)</code></summary><pre>", html)
        assert len(site_labels) == 5001
        assert site_labels[7] == "app/m7.py:7 in f7 ← app/caller7.py:1 in c7"
        assert site_labels[5000] == "app/m7.py:7 in f7 ← app/other.py:2 in other"
        assert site_labels[8] == "app/m8.py:8 in f8"
        assert sum("←" in label for label in site_labels) == 2

    def test_unknown_format(self) -> None:
        with pytest.raises(ValueError, match="unknown format 'pdf'"):
            report.render({}, "pdf")


class TestPoolsOfOneName:
    def test_two_engines_given_one_name_are_two_pools(self, tmp_path: Path) -> None:
        """Two engines attached under one name with different sizes are two pools in the
        report, each with its own size, peak and sizing advice; each can be asked for."""
        store = tmp_path / "poolscope.db"
        url = f"sqlite:///{tmp_path / 'app.db'}"
        small = sa.create_engine(url, poolclass=sa.pool.QueuePool, pool_size=1, max_overflow=0)
        large = sa.create_engine(url, poolclass=sa.pool.QueuePool, pool_size=5, max_overflow=1)
        monitor = instrument.attach(small, store=store, name="orders")
        instrument.attach(large, store=store, name="orders")
        held = [large.connect() for _ in range(4)]
        with small.connect():
            pass
        for conn in held:
            conn.close()
        monitor.flush()
        small.dispose()
        large.dispose()

        text, data = report.make_report(store, fmt="json")
        jsonschema.validate(data, SCHEMA)
        pools = {p["name"]: p for p in data["pools"]}
        assert {name: (p["pool_size"], p["capacity"], p["peak_in_use"], p["checkouts"])
                for name, p in pools.items()} == {"orders": (1, 1, 1, 1),
                                                  "orders#2": (5, 6, 4, 4)}  # fmt: skip
        for p in pools.values():
            sizing = p["sizing"]
            assert (sizing["pool_size"], sizing["capacity"]) == (p["pool_size"], p["capacity"])
            assert sizing["peak_in_use"] <= sizing["capacity"]
        assert data["summary"]["pools"] == 2
        assert "(peak 4 of 6)" in pools["orders#2"]["sizing"]["advice"]
        _, only = report.make_report(store, analysis.Filters(pools=("orders#2",)), fmt="json")
        assert [p["name"] for p in only["pools"]] == ["orders#2"]


HOSTILE_THREAD = "\x1b]0;pwned\x07\x1b[2J"
HOSTILE_POOL = "app\n# heading\n<script>alert(1)</script>|x"
HOSTILE_FILE = "mod\x1b[31m<img src=x onerror=alert(1)>`x`.py"
HOSTILE_SOURCE = """\
import gc


def leak(engine):
    engine.connect().exec_driver_sql("select 1")  # never closed: the GC returns it
    gc.collect()
"""
HEADINGS = ["# poolscope report: ", "## Leaks", "### <code>gc\\_reclaimed</code> × 1 at ",
            "## Timeouts", "## Pools", "## Sites", "## Sizing"]  # fmt: skip
C0_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
UNESCAPED_PIPE = re.compile(r"(?<!\\)(?:\\\\)*\|")
RAW_TAG = re.compile(r"(?<!\\)(?:\\\\)*<(script|img)", re.IGNORECASE)


@pytest.fixture
def hostile(tmp_path: Path, sqlite_url: str) -> dict[str, str]:
    """A store recorded by the real recorder from a thread, a pool and a source file whose
    names carry terminal escapes, markdown headings, HTML and backticks; in every format."""
    import importlib.util
    import threading

    import sqlalchemy as sa

    source = tmp_path / HOSTILE_FILE
    source.write_text(HOSTILE_SOURCE)
    spec = importlib.util.spec_from_file_location("hostile_mod", source)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    engine = sa.create_engine(sqlite_url)
    store = tmp_path / "hostile.db"
    monitor = instrument.attach(engine, store=store, name=HOSTILE_POOL)
    thread = threading.Thread(target=module.leak, args=(engine,), name=HOSTILE_THREAD)
    thread.start()
    thread.join()
    monitor.flush()
    monitor.detach()
    engine.dispose()
    out = {fmt: report.make_report(store, fmt=fmt)[0] for fmt in report.FORMATS}
    data = json.loads(out["json"])
    assert [(leak["pool"], leak["threads"]) for leak in data["leaks"]] == [
        (HOSTILE_POOL, [HOSTILE_THREAD])
    ]
    assert HOSTILE_FILE in data["leaks"][0]["site"]  # the JSON keeps the values as they are
    return out


class TestHostileNames:
    def test_text_shows_control_characters_as_escapes(self, hostile: dict[str, str]) -> None:
        """No escape sequence, bell or carriage return reaches the terminal: they are
        written as ``\\x1b`` and the only line breaks are the layout's."""
        text = hostile["text"]
        assert C0_BUT_NEWLINE.search(text) is None
        assert "\\x1b]0;pwned\\x07\\x1b[2J" in text
        assert "app\\n# heading\\n<script>alert(1)</script>|x" in text
        assert "mod\\x1b[31m<img src=x onerror=alert(1)>`x`.py" in text
        assert not any(line.startswith(("# heading", "<script")) for line in text.splitlines())

    def test_markdown_escapes_every_value(self, hostile: dict[str, str]) -> None:
        """No injected heading, no raw HTML tag, and every table row stays one line with
        its own cells."""
        md = hostile["markdown"]
        assert C0_BUT_NEWLINE.search(md) is None
        assert RAW_TAG.search(md) is None
        lines = md.splitlines()
        headings = [line for line in lines if line.lstrip().startswith("#")]
        assert len(headings) == len(HEADINGS)
        assert all(h.startswith(want) for h, want in zip(headings, HEADINGS, strict=True))
        tables = 0
        for i, line in enumerate(lines):
            if line.startswith("| ---") or line.startswith("| ---:"):
                tables += 1
                head = lines[i - 1]
                cells = len(UNESCAPED_PIPE.findall(head))
                for row in lines[i + 1 :]:
                    if not row.startswith("|"):
                        break
                    assert row.endswith(" |") and len(UNESCAPED_PIPE.findall(row)) == cells, row
        assert tables == 3  # leaks, pools, sites
        escaped_pool = "app\\\\n\\# heading\\\\n\\<script\\>alert(1)\\</script\\>\\|x"
        assert f"| <code>{escaped_pool}</code> |" in md  # in the leak table too
        assert "threads <code>\\\\x1b\\]0;pwned\\\\x07\\\\x1b\\[2J</code>" in md

    def test_html_escapes_every_value(self, hostile: dict[str, str]) -> None:
        """The HTML report keeps every name as text: no tag from the store, balanced tags."""
        checker = _Checker()
        checker.feed(hostile["html"])
        assert not checker.tags & {"script", "img", "iframe"}
        assert checker.stack == []
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in hostile["html"]
