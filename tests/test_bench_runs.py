"""The learning benchmarks' shared runner: worker processes share specs by claim files."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np

from ._procs import REPO

sys.path.insert(0, str(REPO / "bench"))
import runs  # noqa: E402  (bench/ is a folder of scripts, not a package)


def test_a_spec_is_claimed_once_and_a_dead_claim_is_taken_over(tmp_path):
    assert runs.claim(tmp_path, "a")
    assert not runs.claim(tmp_path, "a")  # this process holds it
    (tmp_path / "b.json").write_text("{}")
    assert not runs.claim(tmp_path, "b")  # done
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "c.claim").write_text(f"{platform.node()} {gone.pid}")
    assert runs.claim(tmp_path, "c")  # its claimer has ended
    (tmp_path / "d.claim").write_text(f"another-machine {gone.pid}")
    assert not runs.claim(tmp_path, "d")  # cannot tell: left to the other machine


def test_workers_share_the_specs_and_each_runs_once(tmp_path):
    """Two workers over the same specs: every spec runs exactly once, none is left claimed."""
    script = tmp_path / "bench_toy.py"
    script.write_text(
        f"import sys, os, time, json\nsys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import runs\n"
        "def specs(seeds, rounds):\n"
        "    return [runs.spec('v', f'o{i}', 'd3po', 0, rounds=rounds) for i in range(6)]\n"
        "def runner(s, out, model):\n"
        "    path = out / f\"{s['id']}.json\"\n"
        "    if path.exists():\n"
        "        return json.loads(path.read_text())\n"
        "    (out / f'worker-{os.getpid()}').touch()\n"
        "    deadline = time.time() + 120\n"  # each worker's first spec waits for the other's
        "    while len(list(out.glob('worker-*'))) < 2 and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    with open(out / 'ran.log', 'a') as f:\n"
        "        f.write(s['id'] + ' ' + str(os.getpid()) + '\\n')\n"
        "    result = {'id': s['id']}\n"
        "    runs.save_result(path, result)\n"
        "    return result\n"
        "def report(results, plot):\n"
        "    print('results', len(results))\n"
        "runs.main('toy', specs, report, seeds=1, plot='x.png', runner=runner,\n"
        "          describe=lambda r: r['id'])\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), "--jobs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "results 6" in proc.stdout
    ran = (out / "ran.log").read_text().split("\n")[:-1]
    ids = sorted(line.split()[0] for line in ran)
    assert ids == sorted(f"v--o{i}--s0" for i in range(6))  # each once
    assert len({line.split()[1] for line in ran}) == 2  # by both workers
    assert not list(out.glob("*.claim"))
    assert json.loads((out / "v--o0--s0.json").read_text()) == {"id": "v--o0--s0"}


def test_a_run_made_before_a_default_changed_is_set_aside_and_left_out(tmp_path):
    """A cached run stands only while its spec still asks for the settings it ran with: one
    made at another β (a default changed since) is moved aside, kept, to be run again; a
    difference in memory-only settings, or a setting added since, is no difference."""
    s = runs.spec("kto-b", "warmth", "kto", 1, rounds=1, config={"beta": 5000.0})
    ran = runs.config_of(s).to_dict()
    still = {**ran, "gradient_checkpointing": False}  # memory only
    del still["reference_point"]  # added since: its default is the old behaviour
    still["lora"] = {k: v for k, v in ran["lora"].items() if k != "dora"}  # and in a group
    assert runs.stale_settings({"method": "kto", "full_config": still}, s) == {}
    wider = {**ran, "lora": {**ran["lora"], "rank": 8}}
    assert runs.stale_settings({"method": "kto", "full_config": wider}, s) == {
        "lora": (wider["lora"], ran["lora"])
    }
    old = {**ran, "beta": 2500.0}
    assert runs.stale_settings({"method": "kto", "full_config": old}, s) == {
        "beta": (2500.0, 5000.0)
    }
    assert runs.stale_settings({"method": "diffusion-dpo", "full_config": ran}, s) == {
        "method": ("diffusion-dpo", "kto")
    }
    other = runs.spec("kto-b", "contrast", "kto", 1, rounds=1, config={"beta": 5000.0})
    (tmp_path / f"{s['id']}.json").write_text(json.dumps({"method": "kto", "full_config": old}))
    (tmp_path / f"{other['id']}.json").write_text(json.dumps({"method": "kto", "full_config": ran}))
    moved = runs.set_aside_stale([s, other], tmp_path)
    assert moved == [f"{s['id']} (beta 2500.0 -> 5000.0)"]
    assert (tmp_path / "stale" / f"{s['id']}.json").exists()  # kept
    assert [p.name for p in tmp_path.glob("*.json")] == [f"{other['id']}.json"]


def test_the_stored_benchmark_runs_are_what_their_specs_ask_of_todays_engine():
    """The cached runs behind docs/benchmarks.md's learning tables were made with the settings
    their specs ask today: a changed default leaves no table describing other settings; and
    the taste benchmark's default rows are the engine's defaults."""
    import ablation
    import learning
    import tastes
    import unseen_tastes

    from d3po_core.settings import DEFAULT_METHOD, SampleSettings

    method, overrides = tastes.VARIANTS[tastes.DEFAULT_VARIANT]
    config = runs.METHODS[method].config
    assert method == DEFAULT_METHOD and config.from_dict(overrides) == config()
    sampled = {**runs.SAMPLED_AS, **tastes.SAMPLING.get(tastes.DEFAULT_VARIANT, {})}
    assert sampled["strength"] == SampleSettings().strength  # and sample as the engine does
    checked = 0
    benches = [(tastes.specs(9, 3, prompts), out) for prompts, out in tastes.PROMPT_SETS.values()]
    # the defaults' open-prompt runs made again on the CPU (most of the first ran on a GPU)
    benches += [(tastes.specs(3, 3, tastes.OPEN_PROMPTS), "tastes-open-cpu")]
    # the defaults and the DoRA variants on one H200 (seeds 0-2)
    benches += [(tastes.specs(3, 3, tastes.OPEN_PROMPTS), "tastes-open-h200")]
    benches += [(learning.specs(6, 3), "learning"), (ablation.specs(6, 4), "ablation")]
    benches += [(unseen_tastes.specs(6, 3), "tastes-unseen")]  # the tastes the defaults never saw
    # the defaults now (strength 1.25) and the round settings at strength 1, on one machine
    benches += [(tastes.specs(12, 3, tastes.OPEN_PROMPTS), "tastes-open-strength")]
    benches += [(unseen_tastes.specs(6, 3), "tastes-unseen-strength")]
    benches += [(tastes.specs(3, 3, tastes.OPEN_PROMPTS), "tastes-open-ensemble")]
    benches += [(tastes.specs(6, 5, tastes.OPEN_PROMPTS), "tastes-open-5rounds")]  # 40 picks
    for specs, out in benches:
        for s in specs:
            path = REPO / "bench" / "results" / out / f"{s['id']}.json"
            if path.exists():
                result = json.loads(path.read_text())
                assert runs.stale_settings(result, s) == {}, s["id"]
                if out.startswith("tastes"):  # evaluated on the prompts it labeled
                    assert result["eval_set"]["prompts"] == runs.prompts_of(s)[:4], s["id"]
                checked += 1
    # the defaults' rows: 6 seeds on the default prompts (in their own folder); examples'
    # prompts' tables describe the defaults before the third epoch
    described = {
        "open": (tastes.DEFAULT_VARIANT, "tastes-open-strength", 6),
        "named": ("kto-replay-b5000", "tastes", 3),
    }
    for name, (prompts, _out) in tastes.PROMPT_SETS.items():
        variant, out, seeds = described[name]
        assert all(
            (REPO / "bench" / "results" / out / f"{s['id']}.json").exists()
            for s in tastes.specs(seeds, 3, prompts)
            if s["variant"] == variant
        ), out
    assert checked > 400


def test_a_run_on_other_prompts_than_its_spec_asks_is_stale():
    """A spec names the prompts it labels (examples/prompts.txt when it names none); a cached
    run made on other prompts does not stand for it."""
    named = runs.spec("v", "warmth", "kto", 0, rounds=1)
    shapes = runs.spec("v", "warmth", "kto", 0, rounds=1, prompts=["a shape", "a large shape"])
    assert "prompts" not in named and runs.prompts_of(named) == runs.PROMPTS
    assert runs.prompts_of(shapes) == ["a shape", "a large shape"]
    ran = {"method": "kto", "full_config": runs.config_of(named).to_dict()}
    assert runs.stale_settings({**ran, **named}, named) == {}
    assert runs.stale_settings({**ran, **named}, shapes) == {
        "prompts": (runs.PROMPTS, ["a shape", "a large shape"])
    }
    assert runs.stale_settings({**ran, **shapes}, shapes) == {}


def test_a_run_of_other_rounds_than_its_spec_asks_is_stale():
    """A cached 4-round run does not stand for a 3-round spec: the tables report a run's last
    round, so a folder mixing the two would compare runs after different numbers of picks."""
    three = runs.spec("v", "warmth", "kto", 0, rounds=3)
    four = runs.spec("v", "warmth", "kto", 0, rounds=4)
    ran = {"method": "kto", "full_config": runs.config_of(three).to_dict()}
    assert runs.stale_settings({**ran, **three}, three) == {}
    assert runs.stale_settings({**ran, **four}, three) == {"rounds": (4, 3)}


def test_the_warning_check_counts_flagged_rounds_and_the_ground_they_lost():
    """warning_calibration: a round is flagged by the studio's rule on its held-out agreement
    and lost ground when its own taste's win rate fell by more than 0.03 (round 1: below 0.5)."""
    import tastes

    def run(taste, rounds):  # rounds: (win rate, held-out agreement) from round 1
        table = [{"tastes": {taste: {"win_rate": 0.5}}, "heldout_agreement": None}]
        table += [{"tastes": {taste: {"win_rate": w}}, "heldout_agreement": h} for w, h in rounds]
        return {"objective": taste, "table": table}

    results = [
        run("warmth", [(0.7, 0.75), (0.6, 0.25), (0.8, 0.375)]),  # lost at 2, flagged at 2
        run("contrast", [(0.4, 0.875), (0.6, 0.5), (0.5, 0.5)]),  # lost at 1 and 3, flagged at 2
        {"objective": "random", "table": []},  # the control is not counted
    ]
    text = tastes.warning_calibration(results)
    assert text.startswith("6 rounds of 2 runs picking by a taste; 0.50 of them lost ground")
    studio = next(line for line in text.splitlines() if "(the studio's)" in line)
    # flagged: warmth round 2 (0.25 < 0.375; also 0.5 below round 1) and contrast round 2
    # (3 of 8 fewer than round 1): 2 of 6, 1 of them lost ground, 1 of the 3 lost rounds
    cells = [c.strip() for c in studio.strip("|").split("|")]
    assert cells[2:5] == ["0.33", "0.50", "0.33"]
    # their changes: warmth −0.10, contrast +0.20; the rest +0.20, −0.10, +0.20, −0.10
    assert cells[5:] == ["+0.050", "+0.050", "0.50"]


def test_the_ceiling_table_splits_the_win_rate_at_the_bases_top_tenth():
    """ceilings: the pairs whose base image is in the base's top tenth are counted apart, and
    the win rate if the rest were all won is what the top tenth leaves."""
    import tastes

    base = [i / 100 for i in range(20)]  # the top tenth: 0.18 and 0.19
    tuned = [b + 0.05 for b in base[:15]] + [b - 0.05 for b in base[15:]]  # 0.15… lose
    scores = {name: base for name in tastes.TASTES}
    run = {
        "objective": "contrast",
        "eval_scores": [scores, {**scores, "contrast": tuned}],
    }
    line = next(row for row in tastes.ceilings([run]).splitlines() if row.startswith("| contrast"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # top tenth from 0.171 (numpy's interpolation), highest tuned 0.19; top tenth 0 of 2 won,
    # the rest 15 of 18; all 15 of 20; if the rest all won: 18 of 20
    assert cells[1:] == ["0.171", "0.19", "0.00", "0.83", "0.75", "0.90"]
    assert len(tastes.ceilings([run]).splitlines()) == 3  # the other tastes had no runs


def test_the_churn_table_counts_the_pairs_that_change_side_between_rounds():
    """churn: a pair won after round 1 and lost after round 2 (or the other way) counts, a pair
    that stays won or stays lost does not, whatever the win rate does."""
    import tastes

    base = [0.0, 0.0, 0.0, 0.0]
    rounds = [[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, 1, -1]]  # 2 of 4 change side, then none
    scores = [{name: base for name in tastes.TASTES}]
    scores += [{name: base for name in tastes.TASTES} | {"detail": r} for r in rounds]
    run = {"objective": "detail", "eval_scores": scores}
    table = tastes.churn([run, {**run}]).splitlines()
    assert table[0].count("changed side") == 2
    assert table[2] == "| detail | 2 | 0.50 | 0.00 |"
    assert len(table) == 3  # the other tastes had no runs
    assert "no runs" in tastes.churn([{**run, "eval_scores": scores[:2]}])


def test_a_run_labels_grids_of_the_prompts_its_spec_names():
    """Run.simulate labels (and holds out) grids of the spec's prompts, in turn."""
    import tastes

    quick = {"noise_draws": 1, "epochs": 1}
    prompts = ["a shape", "a square"]
    s = runs.spec(
        "v", "warmth", "kto", 0, rounds=1, config=quick, settings={"steps": 2}, prompts=prompts
    )
    run = runs.Run.of(s, None)
    seen: list[str] = []

    def prompts_of_grids(session) -> None:
        for pick in session.training_picks(since_last_round=False):
            seen.append(session.grid(pick["grid_id"])["prompt"])

    run.simulate(tastes.warmth, tastes.EvalSet(["a shape"], [0]), on_session=prompts_of_grids)
    assert len(seen) == 2 * run.grids  # a round's grids and the held-out next ones
    assert seen == prompts * run.grids


def test_a_folder_of_runs_on_other_prompts_is_refused_and_kept(tmp_path):
    """Runs on other prompts, or of other rounds, are another benchmark's, not stale ones: a
    command asking for others on their folder stops with a clear message and moves nothing."""
    script = tmp_path / "bench_toy.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import runs\n"
        "def specs(seeds, rounds, prompts):\n"
        "    return [runs.spec('v', 'o', 'kto', 0, rounds=rounds, prompts=prompts)]\n"
        "def report(results, plot):\n"
        "    print('results', len(results), plot.name)\n"
        "sets = {'open': (['a shape'], 'toy-open'), 'named': (runs.PROMPTS, 'toy')}\n"
        "runs.main('toy', specs, report, seeds=1, plot='x.png', prompt_sets=sets)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    named = runs.spec("v", "o", "kto", 0, rounds=4)
    (out / "v--o--s0.json").write_text(json.dumps(named))

    def report(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), "--report-only", "--out", str(out), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    refused = report()  # --prompts open, the first set
    assert refused.returncode == 2
    assert "holds runs made with other prompts than asked (v--o--s0 and 0 more)" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["v--o--s0.json"]  # nothing set aside
    fewer = report("--prompts", "named", "--rounds", "3")  # the run has 4
    assert fewer.returncode == 2
    assert "holds runs made with other rounds than asked (v--o--s0 and 0 more)" in fewer.stderr
    assert [p.name for p in out.iterdir()] == ["v--o--s0.json"]
    same = report("--prompts", "named")
    assert same.returncode == 0, same.stderr
    assert "results 1 out.png" in same.stdout  # the results folder names its plot


def test_a_report_joins_folders_run_by_run_and_prefers_out(tmp_path):
    """--also: a run the results folder lacks comes from the first other folder that holds
    it, a run in both from --out, and nothing is copied or run; --first-seed leaves the
    seeds before it out."""
    script = tmp_path / "bench_toy.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import runs\n"
        "def specs(seeds, rounds):\n"
        "    return [runs.spec('v', 'o', 'kto', s, rounds=rounds) for s in range(seeds)]\n"
        "def report(results, plot):\n"
        "    print('results', sorted((r['seed'], r['where']) for r in results))\n"
        "runs.main('toy', specs, report, seeds=3, plot='x.png')\n"
    )
    out, cpu, gpu = (tmp_path / name for name in ("out", "cpu", "gpu"))
    for folder, seeds in ((out, [0]), (cpu, [0, 1]), (gpu, [1, 2])):
        folder.mkdir()
        for seed in seeds:
            s = runs.spec("v", "o", "kto", seed, rounds=4)
            (folder / f"{s['id']}.json").write_text(json.dumps({**s, "where": folder.name}))
    cmd = [sys.executable, str(script), "--report-only", "--out", str(out)]
    joined = subprocess.run(
        [*cmd, "--also", str(cpu), "--also", str(gpu)], capture_output=True, text=True, timeout=120
    )
    assert joined.returncode == 0, joined.stderr
    assert "results [(0, 'out'), (1, 'cpu'), (2, 'gpu')]" in joined.stdout
    alone = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "results [(0, 'out')]" in alone.stdout
    # --first-seed: only the seeds from it on (fresh ones, no choice was made on)
    fresh = subprocess.run(
        [*cmd, "--also", str(gpu), "--first-seed", "1"], capture_output=True, text=True, timeout=120
    )
    assert "results [(1, 'gpu'), (2, 'gpu')]" in fresh.stdout, fresh.stderr
    assert sorted(p.name for p in out.iterdir()) == ["v--o--s0.json"]


def test_the_unseen_tastes_rank_the_worlds_clean_renders():
    """The five tastes the defaults were not chosen on order the embedded world's own
    renders as their names say, and the unseen benchmark labels and scores by them."""
    import tastes
    import unseen_tastes
    from PIL import Image
    from unseen_tastes import bottom_right as corner
    from unseen_tastes import dark, light, muted, vivid

    from d3po_core.embedded.world import Scene, render

    def image(**kw) -> Image.Image:
        scene = {"kind": "square", "colour": "red", "size": "medium"}
        return Image.fromarray(render(Scene(**(scene | kw))))

    on = {"background": "gray", "placement": "center"}
    assert light(image(background="white", placement="center")) > light(image(**on))
    assert light(image(**on)) > light(image(background="black", placement="center"))
    assert vivid(image(**on)) > 0.7 > 0.1 > vivid(image(**on | {"colour": "white"}))
    assert vivid(image(**on | {"colour": "blue"})) > 0.7  # cold counts as much as warm
    assert corner(image(background="gray", placement="bottom")) > corner(image(**on))
    assert corner(image(**on)) > corner(image(background="gray", placement="top"))
    assert corner(image(**on)) == tastes.top_left(image(**on).rotate(180))
    for scene in (on, on | {"background": "white"}, on | {"colour": "white"}):
        assert dark(image(**scene)) == 1 - light(image(**scene))
        assert muted(image(**scene)) == 1 - vivid(image(**scene))
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert vivid(blank) == muted(blank) == 0  # no shape: neither taste's
    specs = unseen_tastes.specs(3, 3)  # without the taste benchmark's tastes swapped in
    assert tastes.TASTES is not unseen_tastes.UNSEEN
    assert {s["objective"] for s in specs} == {*unseen_tastes.UNSEEN, runs.CONTROL}
    assert {s["variant"] for s in specs} == set(unseen_tastes.CHECKED)
    assert len(specs) == 3 * (len(unseen_tastes.UNSEEN) + 1) * len(unseen_tastes.CHECKED)


def test_variants_pair_with_the_defaults_run_by_run_on_one_machine_only():
    """paired: a variant's last-round win rate on its own taste minus the defaults' run of the
    same taste and seed, counted only where both ran on the same machine."""
    import tastes

    def run(variant, taste, seed, machine, win):
        last = {"tastes": {taste: {"win_rate": win}}}
        return {"variant": variant, "objective": taste, "seed": seed, "machine": machine,
                "table": [{"tastes": {taste: {"win_rate": 0.5}}}, last]}  # fmt: skip

    base, other = tastes.DEFAULT_VARIANT, "v"
    results = [
        run(base, "warmth", 0, "cpu", 0.80),
        run(other, "warmth", 0, "cpu", 0.90),  # +0.10
        run(base, "detail", 0, "cpu", 0.70),
        run(other, "detail", 0, "cpu", 0.60),  # -0.10
        run(base, "detail", 1, "cpu", 0.50),
        run(other, "detail", 1, "cpu", 0.80),  # +0.30
        run(base, "contrast", 0, "gpu", 0.80),
        run(other, "contrast", 0, "cpu", 0.20),  # another machine: no pair
        run(other, "random", 0, "cpu", 0.10),  # the control is not a taste
    ]
    row = next(line for line in tastes.paired(results).splitlines() if line.startswith("| v |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # three pairs, mean +0.10, se = sd(0.1, -0.1, 0.3) / sqrt(3) = 0.2 / sqrt(3)
    assert cells[1:4] == ["3", "+0.100 ± 0.115", "2 / 1"]
    assert cells[4:] == ["+0.10 (1)", "–", "–", "–", "+0.10 (2)"]
    assert "no run pairs" in tastes.paired([run(other, "warmth", 0, "cpu", 0.9)])


def test_the_placement_table_counts_the_images_that_changed_layout():
    """placement.row: an image whose centre is nearest another of the world's placements
    changed layout; the top-left win rate of the others is counted apart (ties half)."""
    import placement

    base_xy = np.array([[21.0, 32.0], [32.0, 21.0], [32.0, 32.0], [43.0, 32.0]])
    tuned_xy = np.array([[22.0, 33.0], [32.0, 43.0], [31.0, 31.0], [np.nan, np.nan]])
    base_tl, tuned_tl = np.array([0.6, 0.6, 0.5, 0.4]), np.array([0.55, 0.4, 0.52, 0.4])
    row = placement.row("t", (base_xy, base_tl), (tuned_xy, tuned_tl))
    # left stays left, top becomes bottom, center stays, right loses its shape (−1)
    assert row["placement changed"] == 0.5
    assert row["top_left win rate, same placement"] == 0.5  # lost one, won one
    assert row["top_left win rate"] == (1 + 0.5) / 4  # one win, one tie
    assert row["placements (center, left, right, top, bottom)"] == "1 / 1 / 0 / 0 / 1"
    everywhere = placement.row("t", (base_xy, base_tl), (base_xy[::-1], tuned_tl))
    assert everywhere["placement changed"] == 1.0  # none kept its placement: no win rate
    assert np.isnan(everywhere["top_left win rate, same placement"])


def test_a_run_sampled_at_another_adapter_strength_is_stale():
    """A spec samples at strength 1 unless its settings ask otherwise (the stored runs were
    made so); a run recorded at another strength does not stand for it, and a run from before
    strength was recorded stands for strength 1 only."""
    plain = runs.spec("v", "warmth", "kto", 0, rounds=1)
    strong = runs.spec("v", "warmth", "kto", 0, rounds=1, settings={"strength": 1.25})
    at = {s: {"sample_settings": {"guidance": 2.0, "strength": s}} for s in (1.0, 1.25)}
    assert runs.stale_settings(at[1.0], plain) == {}
    assert runs.stale_settings(at[1.25], plain) == {"strength": (1.25, 1.0)}
    assert runs.stale_settings(at[1.0], strong) == {"strength": (1.0, 1.25)}
    assert runs.stale_settings(at[1.25], strong) == {}
    older = {"sample_settings": {"guidance": 2.0}}
    assert runs.stale_settings(older, plain) == {}
    assert runs.stale_settings(older, strong) == {"strength": (1.0, 1.25)}
