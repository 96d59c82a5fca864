"""Continual fine-tuning, measured like a paper: one customer through weekly data drops whose task mix shifts,
under each training strategy a customer can choose in the customers file, with forgetting per version.

Every drop goes through the project's own code: the data chain (`ftops.data.tasks.prepare`, into dataset versions
in a temporary storage root), the training mix (`ftops.data.snapshot.training_mix`), the training function that
`ftops train` runs (`ftops.model.train.train`), the replay share (`TrainingSettings.replay_share`, which
`ftops.model.tasks.train` calls) and evaluation's held-out loss (`ftops.model.evaluate._loss`). Each version is
taken as production for the next drop (no gate here: the bench compares training strategies).

Drops: `--drops DIR` reads `DIR/01.jsonl`, `DIR/02.jsonl`, ... (any format ingest accepts); without it the bench
writes its own: each drop a new task with a checkable answer (ticket routing, French, capitals,
count, sort, reverse, plural...), drop 7 brings drop 1's task (ticket routing) back.

After every version: held-out loss on every drop so far (versions x drops), exact match and chrF of greedy answers
per drop (against the reference answer), trained tokens and seconds. Forgetting per Chaudhry et al. 2018: for each
earlier drop, its loss after the last version minus the best loss it had after any version; `avg_forgetting` the
mean over earlier drops. `bwt` (Lopez-Paz & Ranzato 2017, in loss terms): mean over earlier drops of (loss right
after it was learned - loss after the last version): negative means forgotten.

    .venv/bin/python bench/continual.py --quick [--drops DIR]           # tiny model, CI-sized
    .venv/bin/python bench/continual.py                                  # SmolLM2-135M, the README's table

Strategies are interleaved per drop (drop k of every strategy before drop k+1 of any), so training seconds
compare on the same machine load. Prints one JSON line last; writes `docs/continual[-quick].{md,png}`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

CUSTOMER = "continual-bench"
SMOLLM = ROOT / ".ftops" / "models" / "smollm2-135m-instruct"

# Each strategy is the `training:` block a customer would write (the bench's common settings added).
STRATEGIES: dict[str, dict] = {
    "fresh_replay": {"init": "fresh", "replay": "fixed", "replay_fraction": 0.2},  # the default before this table
    "full_retrain": {"init": "fresh", "replay": "fixed", "replay_fraction": 1.0},
    "production_noreplay": {"init": "production", "replay": "fixed", "replay_fraction": 0.0},
    "production_replay_0.05": {"init": "production", "replay": "fixed", "replay_fraction": 0.05},
    "production_replay_0.2": {"init": "production", "replay": "fixed", "replay_fraction": 0.2},
    "production_replay_0.5": {"init": "production", "replay": "fixed", "replay_fraction": 0.5},
    "adaptive": {"init": "production", "replay": "adaptive", "replay_fraction": 0.2},
    # Ibrahim et al. 2024: re-warm then re-decay. Every version already re-decays (cosine from the peak LR);
    # this one adds a linear warm-up over 10 % of the steps.
    "production_replay_0.2_warmup": {
        "init": "production",
        "replay": "fixed",
        "replay_fraction": 0.2,
        "warmup_ratio": 0.1,
    },
}
REQUIRED = [s for s in STRATEGIES if s != "production_replay_0.2_warmup"]
# The default is chosen among strategies that train at most this share of a full retrain's tokens.
TOKEN_BUDGET = 0.5

# --- generated drift drops: one task per drop, answers checkable by exact match -------------------------

FRENCH = {
    "cat": "chat", "dog": "chien", "house": "maison", "tree": "arbre", "book": "livre", "car": "voiture",
    "bird": "oiseau", "apple": "pomme", "water": "eau", "bread": "pain", "door": "porte", "table": "table",
    "chair": "chaise", "road": "route", "river": "riviere", "flower": "fleur", "moon": "lune", "sun": "soleil",
    "star": "etoile", "cloud": "nuage", "train": "train", "boat": "bateau", "school": "ecole", "friend": "ami",
    "window": "fenetre", "garden": "jardin", "horse": "cheval", "ship": "navire", "milk": "lait",
    "cheese": "fromage", "shoe": "chaussure", "hat": "chapeau", "key": "cle", "clock": "horloge", "city": "ville",
    "beach": "plage", "forest": "foret", "mountain": "montagne", "letter": "lettre", "bag": "sac",
}  # fmt: skip
WORDS = sorted(FRENCH)
ROUTES = {
    "billing": ["I was charged twice for", "my invoice is wrong about", "please refund the payment for"],
    "shipping": ["my parcel never arrived with", "the delivery is late for", "tracking shows nothing for"],
    "account": ["I cannot log in to see", "please reset my password for", "my email changed, update"],
    "technical": ["the app crashes when I open", "I get an error when I save", "the page freezes on"],
}
OPENERS = ["Hello,", "Hi team,", "Good morning,", "Hey,", "Dear support,", "Quick question:"]
CLOSERS = ["Thanks.", "Please help.", "Regards.", "Cheers.", "Thank you!", "Any idea?"]


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(4, 6))


def _task(name: str, rng: random.Random) -> tuple[str, str]:
    w = _words(rng)
    text = " ".join(w)
    if name == "reverse":
        return f"Reverse the order of these words: {text}", " ".join(reversed(w))
    if name == "capitals":
        return f"Write these words in capitals: {text}", text.upper()
    if name == "french":
        return f"Translate into French, word by word: {text}", " ".join(FRENCH[x] for x in w)
    if name == "sort":
        return f"Sort these words alphabetically: {text}", " ".join(sorted(w))
    if name == "count":
        return f"How many words are in this list: {text}", str(len(w))
    if name == "plural":
        return f"Give the plural of each word: {text}", " ".join(x + "s" for x in w)
    if name == "first_last":
        return f"Name the first and the last word: {text}", f"{w[0]} {w[-1]}"
    if name == "route":
        label = rng.choice(sorted(ROUTES))
        body = f"{rng.choice(OPENERS)} {rng.choice(ROUTES[label])} my {w[0]} and {w[1]}. {rng.choice(CLOSERS)}"
        return f"Route this support ticket to billing, shipping, account or technical: {body}", label
    raise ValueError(name)


# Drop 7 brings drop 1's task back; more drops cycle through the rest.
SCHEDULE = ["route", "french", "capitals", "count", "sort", "reverse", "route", "plural", "first_last"]


def generate_drops(out: Path, n_drops: int, per_drop: int, seed: int = 0) -> list[tuple[Path, str]]:
    out.mkdir(parents=True, exist_ok=True)
    drops = []
    for i in range(n_drops):
        task = SCHEDULE[i % len(SCHEDULE)]
        rng = random.Random(f"{seed}-{i}")
        rows = []
        for _ in range(per_drop):
            prompt, answer = _task(task, rng)
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        path = out / f"{i + 1:02d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        drops.append((path, task))
    return drops


def read_drops(folder: Path) -> list[tuple[Path, str]]:
    """`01.jsonl`, `02.csv`, ...: files named by their drop number, in that order."""
    found = sorted((int(p.name.split(".")[0]), p) for p in folder.iterdir() if re.fullmatch(r"\d+\..+", p.name))
    if not found:
        raise SystemExit(f"{folder}: no drop files named like 01.jsonl")
    return [(p, p.name) for _, p in found]


# --- the run --------------------------------------------------------------------------------------------


def prepare_drops(store, drops: list[tuple[Path, str]], val_fraction: float) -> list[str]:
    """Each drop through the data chain (ingest, validate, clean, dedupe, snapshot): one dataset version each."""
    from ftops.config import DataPolicy
    from ftops.data.ingest import local_files
    from ftops.data.tasks import prepare

    policy = DataPolicy(val_fraction=val_fraction)
    versions = []
    for i, (path, _) in enumerate(drops):
        out = prepare(store, CUSTOMER, local_files([path]), policy, version=f"drop{i + 1:02d}")
        if not out["dataset_version"] or not out["val"] or not out["train"]:
            raise SystemExit(f"{path}: the data chain kept {out.get('train')} train / {out.get('val')} val rows")
        versions.append(out["dataset_version"])
    return versions


def norm(text: str) -> str:
    return " ".join(text.casefold().replace(".", " ").split())


class Scorer:
    """Held-out loss (evaluation's own function) and greedy answers of one adapter on every drop's validation rows."""

    def __init__(self, base_model: str, max_length: int, answer_items: int):
        from transformers import AutoTokenizer

        self.base_model, self.max_length, self.answer_items = base_model, max_length, answer_items
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)

    def __call__(self, adapter: Path, vals: list[list[dict]]) -> dict:
        import torch
        from peft import PeftModel
        from sacrebleu.metrics import CHRF
        from transformers import AutoModelForCausalLM

        from ftops.model.evaluate import _answer, _loss

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter)).eval()
        chrf = CHRF()
        losses, exact, chrfs = [], [], []
        for rows in vals:
            losses.append(_loss(model, self.tokenizer, rows, self.max_length))
            em, cf = [], []
            for r in rows[: self.answer_items]:
                ref = r["messages"][-1]["content"]
                budget = len(self.tokenizer(ref)["input_ids"]) + 4
                got = _answer(model, self.tokenizer, r["messages"][-2]["content"], budget)
                em.append(float(norm(got) == norm(ref)))
                cf.append(chrf.sentence_score(got, [ref]).score)
            exact.append(statistics.mean(em) if em else None)
            chrfs.append(statistics.mean(cf) if cf else None)
        del model, base
        return {"loss": losses, "exact": exact, "chrf": chrfs}


def forgetting(matrix: list[list[float]]) -> tuple[float | None, float | None]:
    """(avg_forgetting, bwt) from the loss matrix (row v: losses on drops 0..v after version v)."""
    last = len(matrix) - 1
    if last < 1:
        return None, None
    f = [matrix[last][d] - min(matrix[v][d] for v in range(d, last + 1)) for d in range(last)]
    b = [matrix[d][d] - matrix[last][d] for d in range(last)]
    return statistics.mean(f), statistics.mean(b)


def run(
    model: str,
    drops: list[tuple[Path, str]],
    strategies: list[str],
    common: dict,
    seeds: list[int],
    work: Path,
    answer_items: int,
    val_fraction: float,
    log=print,
) -> dict:
    import mlflow

    from ftops.config import LoraSettings, TrainingSettings
    from ftops.data import snapshot as snap
    from ftops.model.train import TrainArgs, train
    from ftops.storage import Store

    store = Store(str(work / "storage"))
    versions = prepare_drops(store, drops, val_fraction)
    vals = [snap.read_jsonl(store.get(f"{CUSTOMER}/datasets/{v}/val.jsonl")) for v in versions]
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(mlflow_uri)
    if mlflow.get_experiment_by_name("continual") is None:  # artifacts under the bench's folder, not the cwd
        mlflow.create_experiment("continual", artifact_location=(work / "mlartifacts").as_uri())
    lora = LoraSettings()
    scorer = Scorer(model, common["max_length"], answer_items)
    chains = {
        (name, seed): {
            "settings": TrainingSettings.model_validate(common | STRATEGIES[name] | {"seed": seed}),
            "adapter": None,
            "tags": {},
            "loss": [],
            "exact": [],
            "chrf": [],
            "tokens": 0,
            "seconds": 0.0,
            "shares": [],
        }
        for seed in seeds
        for name in strategies
    }
    for k, version in enumerate(versions):
        for (name, seed), c in chains.items():  # interleaved: drop k of every strategy before drop k+1
            t = c["settings"]
            share, why = t.replay_share(c["tags"].get("replay.fraction"), c["tags"].get("forgetting.max"))
            rows, _val, replayed = snap.training_mix(store, CUSTOMER, [version], versions[:k], share, t.seed)
            d = work / "runs" / f"{name}-s{seed}-v{k + 1}"
            d.mkdir(parents=True)
            (d / "train.jsonl").write_bytes(snap._jsonl(rows))
            # The trainer's own per-epoch validation is left out (it only feeds MLflow's curves): the bench scores
            # every version on every drop's held-out rows with evaluation's function below.
            (d / "val.jsonl").write_bytes(b"")
            init = str(c["adapter"]) if t.init == "production" and c["adapter"] else ""
            args = TrainArgs(
                customer=CUSTOMER,
                base_model=model,
                base_model_slug="bench",
                adapter_version=f"{name}-s{seed}-v{k + 1}",
                train_file=str(d / "train.jsonl"),
                val_file=str(d / "val.jsonl"),
                output_dir=str(d / "out"),
                storage_root=store.root,
                lora=lora,
                training=t,
                init_adapter=init,
                mlflow_uri=mlflow_uri,
                mlflow_experiment="continual",
                params={"replay.fraction": share, "replay.reason": why, "strategy": name},
            )
            result = train(args)
            adapter = d / "out" / "adapter"
            scores = scorer(adapter, vals[: k + 1])
            prev = c["loss"][-1] if c["loss"] else None
            # What evaluation compares on history: the candidate vs production (the previous version), per
            # earlier drop; the worst increase is the `forgetting.max` the registry version carries.
            worst = max((scores["loss"][j] - prev[j] for j in range(k)), default=None) if prev else None
            c["tags"] = {"replay.fraction": str(share), "forgetting.max": "" if worst is None else str(worst)}
            if c["adapter"] is not None:
                shutil.rmtree(c["adapter"].parent.parent, ignore_errors=True)  # keep disk flat on the big model
            c["adapter"] = adapter
            for key in ("loss", "exact", "chrf"):
                c[key].append(scores[key])
            c["tokens"] += result["tokens_seen"]
            c["seconds"] += result["seconds"]
            c["shares"].append(round(share, 4))
            log(
                f"drop {k + 1} {name} seed {seed}: {len(rows)} rows ({len(replayed)} replayed, share {share:g}), "
                f"{result['steps']} steps {result['seconds']:.1f}s; loss per drop "
                + " ".join(f"{x:.3f}" for x in scores["loss"])
            )
    return summarise(chains, strategies, seeds, [task for _, task in drops])


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def summarise(chains: dict, strategies: list[str], seeds: list[int], tasks: list[str]) -> dict:
    out = {}
    for name in strategies:
        runs = [chains[(name, s)] for s in seeds]
        n = len(runs[0]["loss"])
        # Mean over seeds of the loss matrix, then the figures of that matrix; the per-seed forgetting is kept
        # too, to show the spread.
        matrix = [[_mean([r["loss"][v][d] for r in runs]) for d in range(v + 1)] for v in range(n)]
        exact = [[_mean([r["exact"][v][d] for r in runs]) for d in range(v + 1)] for v in range(n)]
        chrf = [[_mean([r["chrf"][v][d] for r in runs]) for d in range(v + 1)] for v in range(n)]
        f, b = forgetting(matrix)
        per_seed = [forgetting(r["loss"])[0] for r in runs]
        out[name] = {
            "settings": STRATEGIES[name],
            "avg_forgetting": _round(f),
            "avg_forgetting_per_seed": [_round(x) for x in per_seed],
            "bwt": _round(b),
            "final_heldout_loss": [_round(x) for x in matrix[-1]],
            "newest_loss": _round(matrix[-1][-1]),
            "plasticity": _round(_mean([matrix[v][v] for v in range(n)])),
            "final_exact_match": [_round(x) for x in exact[-1]],
            "final_chrf": [_round(x, 1) for x in chrf[-1]],
            "train_tokens": round(_mean([r["tokens"] for r in runs])),
            "train_seconds": _round(_mean([r["seconds"] for r in runs]), 1),
            "replay_shares": [r["shares"] for r in runs],
            "loss_matrix": [[_round(x) for x in row] for row in matrix],
            "exact_matrix": [[_round(x) for x in row] for row in exact],
        }
    return {"tasks": tasks, "strategies": out}


def _round(x, nd=4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, nd)


def default_strategy() -> str | None:
    """The strategy whose settings are the shipped defaults (`TrainingSettings()`)."""
    from ftops.config import TrainingSettings

    d = TrainingSettings()
    for name, s in STRATEGIES.items():
        if all(getattr(d, k) == v for k, v in s.items()) and ("warmup_ratio" in s or d.warmup_ratio == 0):
            return name
    return None


def choose(strategies: dict) -> dict:
    """The rule the defaults were chosen by: the least avg_forgetting among strategies that train at most
    TOKEN_BUDGET of a full retrain's tokens and forget no more than fresh_replay (the old default)."""
    full, fresh = strategies.get("full_retrain"), strategies.get("fresh_replay")
    if not full or not fresh or full["avg_forgetting"] is None:
        return {}
    ok = {
        n: s
        for n, s in strategies.items()
        if n != "full_retrain"
        and s["avg_forgetting"] is not None
        and s["train_tokens"] <= TOKEN_BUDGET * full["train_tokens"]
        and s["avg_forgetting"] <= fresh["avg_forgetting"]
    }
    best = min(ok, key=lambda n: ok[n]["avg_forgetting"]) if ok else None
    return {
        "rule": f"least avg_forgetting with train_tokens <= {TOKEN_BUDGET} x full_retrain's and avg_forgetting <= "
        "fresh_replay's",
        "recommended": best,
        "token_share_of_full_retrain": round(ok[best]["train_tokens"] / full["train_tokens"], 3) if best else None,
        "forgetting_above_full_retrain": round(ok[best]["avg_forgetting"] - full["avg_forgetting"], 4)
        if best
        else None,
    }


# --- report ---------------------------------------------------------------------------------------------


def markdown(result: dict, command: str) -> str:
    s = result["strategies"]
    full_tokens = s["full_retrain"]["train_tokens"] if "full_retrain" in s else None
    lines = [
        f"Continual fine-tuning, {result['base_model']}, {result['drops']} weekly drops ({', '.join(result['tasks'])}),"
        f" seeds {result['seeds']}; `{command}`",
        "",
        "| strategy | avg forgetting | BWT | loss drop 1 (final) | newest loss | plasticity | final exact match "
        "(mean over drops) | train tokens | × full retrain | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        em = _mean(r["final_exact_match"])
        share = f"{r['train_tokens'] / full_tokens:.2f}" if full_tokens else ""
        mark = " (default)" if name == result.get("default") else ""
        lines.append(
            f"| `{name}`{mark} | {r['avg_forgetting']} | {r['bwt']} | {r['final_heldout_loss'][0]} | "
            f"{r['newest_loss']} | {r['plasticity']} | {'' if em is None else f'{em:.2f}'} | {r['train_tokens']} | "
            f"{share} | {r['train_seconds']} |"
        )
    c = result.get("choice") or {}
    lines += [
        "",
        "Forgetting (Chaudhry et al.): per earlier drop, held-out loss after the last version minus its best after "
        "any version, averaged. BWT: mean of (loss right after learning a drop − loss after the last version); "
        "negative = forgotten. Plasticity: mean loss on each drop right after learning it.",
        "",
        f"Choice rule: {c.get('rule')}: **{c.get('recommended')}** ({c.get('token_share_of_full_retrain')} of "
        f"full_retrain's tokens, avg forgetting {c.get('forgetting_above_full_retrain')} above full_retrain's).",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["strategies"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in s.items():
        ys = [row[0] for row in r["loss_matrix"]]
        a.plot(range(1, len(ys) + 1), ys, marker="o", label=name, linewidth=2.5 if name == result.get("default") else 1)
        b.scatter(r["train_tokens"], r["avg_forgetting"])
        b.annotate(
            name, (r["train_tokens"], r["avg_forgetting"]), fontsize=8, xytext=(4, 2), textcoords="offset points"
        )
    a.set(xlabel="version (after drop)", ylabel="held-out loss on drop 1", title="Retention of drop 1's task")
    a.legend(fontsize=7)
    b.set(xlabel="trained tokens (all versions)", ylabel="avg forgetting (loss)", title="Forgetting vs compute")
    b.set_xscale("log")
    fig.suptitle(f"{result['base_model']}: {result['drops']} weekly drops")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny test model, few steps (CI, reviewers)")
    ap.add_argument("--drops", type=Path, help="folder of drops 01.jsonl, 02.jsonl, ... (default: generated)")
    ap.add_argument("--model", help="base model folder (default: SmolLM2-135M; --quick: a tiny model built here)")
    ap.add_argument("--n-drops", type=int, default=8)
    ap.add_argument("--per-drop", type=int, help="examples per generated drop")
    ap.add_argument("--strategies", default="all", help="comma list, `all` (the seven) or `all+warmup`")
    ap.add_argument("--seeds", help="comma list of seeds")
    ap.add_argument("--epochs", type=float)
    ap.add_argument("--learning-rate", type=float)
    ap.add_argument("--answer-items", type=int, help="answers generated per drop and version")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the table and plot go")
    ap.add_argument("--no-docs", action="store_true", help="write no table or plot (tests)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (on a shared 2-core machine, 2 spinning OpenMP threads made a tiny step 13x slower)",
    )
    ap.add_argument("--render", type=Path, help="only rewrite the table and plot from a saved run's JSON line")
    a = ap.parse_args(argv)
    if a.render:
        result = json.loads(a.render.read_text().strip().splitlines()[-1])
        return report(result, a, a.docs)
    quick = a.quick
    import torch

    torch.set_num_threads(a.threads)
    preset = (
        {"per_drop": 32, "epochs": 8, "lr": 2e-2, "batch": 8, "max_length": 128, "seeds": "0", "answers": 4}
        if quick
        else {"per_drop": 40, "epochs": 2, "lr": 1e-3, "batch": 4, "max_length": 192, "seeds": "0", "answers": 2}
    )
    strategies = {"all": REQUIRED, "all+warmup": list(STRATEGIES)}.get(a.strategies) or a.strategies.split(",")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    seeds = [int(x) for x in (a.seeds or preset["seeds"]).split(",")]
    common = {
        "epochs": a.epochs or preset["epochs"],
        "max_steps": -1,
        "learning_rate": a.learning_rate or preset["lr"],
        "batch_size": preset["batch"],
        "max_length": preset["max_length"],
        "dpo_max_steps": 0,
        "save_steps": 10_000,
    }
    work = Path(tempfile.mkdtemp(prefix="bench-continual-"))
    started = time.time()
    try:
        if a.drops:
            drops = read_drops(a.drops)
        else:
            drops = generate_drops(work / "drops", a.n_drops, a.per_drop or preset["per_drop"])
        if a.model:
            model, label = a.model, Path(a.model).name
        elif quick:
            from ftops.model.base_models import build_tiny

            texts = [line for p, _ in drops for line in p.read_text(errors="replace").splitlines()]
            model, label = str(build_tiny(work / "tiny", corpus=texts)), "tiny-llama (test model)"
        else:
            from ftops.model.base_models import convert_smollm2

            model, label = str(convert_smollm2(SMOLLM)), "SmolLM2-135M-Instruct"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = run(
            model,
            drops,
            strategies,
            common,
            seeds,
            work,
            a.answer_items if a.answer_items is not None else preset["answers"],
            0.2,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "base_model": label,
        "drops": len(drops),
        "default": default_strategy(),
        "seeds": seeds,
        "settings": common,
        "cores": os.cpu_count(),
        "wall_seconds": round(time.time() - started, 1),
    } | result
    return report(result, a, a.docs)


def report(result: dict, a, docs: Path) -> dict:
    """Choice, default check, table and plot; prints the JSON line."""
    result["default"] = default_strategy()
    result["choice"] = choose(result["strategies"])
    d, s = result["default"], result["strategies"]
    if d in s and {"fresh_replay", "full_retrain"} <= set(s):
        result["default_check"] = {
            "forgets_no_more_than_fresh_replay": s[d]["avg_forgetting"] <= s["fresh_replay"]["avg_forgetting"],
            "tokens_no_more_than_full_retrain": s[d]["train_tokens"] <= s["full_retrain"]["train_tokens"],
        }
    if not a.no_docs and docs.is_dir() and "full_retrain" in s:
        quick = result["base_model"].startswith("tiny")
        stem = "continual-quick" if quick else "continual"
        command = "bench/continual.py" + (" --quick" if quick else "") + (" --drops DIR" if a.drops else "")
        (docs / f"{stem}.md").write_text(markdown(result, command))
        plot(result, docs / f"{stem}.png")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
