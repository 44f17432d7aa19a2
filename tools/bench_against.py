"""Time this working tree against another commit: bench.py in both, in alternating rounds, each
run in its own process, as results/README.md's speed records compare code before and after a
change.

    python tools/bench_against.py 7b14b80 -- --bf16 --batch-size 64
    python tools/bench_against.py HEAD~1 --rounds 4 --out results/bench/NAME.jsonl -- \\
        --dataset multimnist --batch-size 64

Everything after `--` goes to bench.py, run in each arm's own folder. REV is checked out
into a temporary git worktree, removed at the end, Ctrl-C included (so give --profile an
absolute path). Each round runs both arms, the order flipping every
round, so that neither always runs first on a machine whose speed drifts. Every bench.py
object is printed as a JSON line with "arm" ("before": REV, "after": this tree), "round" and
"commit" ("-dirty" where the tree has uncommitted changes), and appended to --out if given.
A table of the train and eval ratios follows, with each arm's median. Run it alone on the
machine: bench.py's numbers are wall-clock rates.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from capslab.errors import UserError, exit_on_user_error, make_output_folder
from capslab.jsonl import read_jsonl, write_jsonl

ARMS = ("before", "after")
COLUMNS = ("train_img_per_s", "train_ratio", "eval_img_per_s", "eval_ratio")


def last_line(text: str) -> str:
    """The last non-blank line of a program's output ("" if none)."""
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def git(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """A git command in `folder`; a UserError with git's own last line if it fails."""
    try:
        result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise UserError("git is not installed; bench_against.py needs it") from error
    if check and result.returncode != 0:
        raise UserError(f"git {args[0]} failed: {last_line(result.stderr) or 'no message'}")
    return result


def commit_of(top: Path, rev: str) -> str:
    """REV's short commit hash in the repository at `top`."""
    result = git(
        top, "rev-parse", "--verify", "--quiet", "--short", f"{rev}^{{commit}}", check=False
    )
    if result.returncode != 0:
        raise UserError(f"{rev!r} is not a commit of {top}")
    return result.stdout.strip()


def tree_commit(top: Path) -> str:
    """This tree's commit, with "-dirty" where it has uncommitted changes."""
    dirty = git(top, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    return commit_of(top, "HEAD") + ("-dirty" if dirty else "")


def run_bench(folder: Path, bench_args: list[str], arm: str) -> dict:
    """bench.py's JSON object from a run in `folder`; its error line if it fails."""
    command = [sys.executable, "bench.py", *bench_args]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(
            f"bench.py failed in the {arm!r} arm (exit status {result.returncode}): "
            f"{last_line(result.stderr) or 'no message'}"
        )
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as error:
        raise UserError(f"bench.py printed no JSON object in the {arm!r} arm") from error


def round_order(round_number: int) -> tuple[str, ...]:
    """before, after in odd rounds; after, before in even ones."""
    return ARMS if round_number % 2 else ARMS[::-1]


def table(records: list[dict]) -> str:
    """Each run's rates and ratios, then each arm's medians."""
    header = f"{'arm':<7} {'round':>5} " + " ".join(f"{name:>16}" for name in COLUMNS)
    rows = [
        f"{r['arm']:<7} {r['round']:>5} " + " ".join(f"{r.get(c) or 0:>16.3f}" for c in COLUMNS)
        for r in records
    ]
    for arm in ARMS:
        mine = [r for r in records if r["arm"] == arm]
        medians = [statistics.median(r.get(c) or 0 for r in mine) for c in COLUMNS]
        rows.append(f"{arm:<7} {'med':>5} " + " ".join(f"{m:>16.3f}" for m in medians))
    return "\n".join([header, *rows])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This tool's flags, and bench.py's (after `--`)."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev", help="the commit to time against (the 'before' arm)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both arms (default: 3)")
    parser.add_argument(
        "--out", type=Path, help="a JSON Lines file to append every bench.py object to"
    )
    args = parser.parse_args(argv[:split])
    if not 1 <= args.rounds <= 100:
        raise UserError(f"--rounds must be between 1 and 100, got {args.rounds}")
    if args.out:
        if args.out.is_dir():
            raise UserError(f"--out {args.out} is a folder, not a file")
        make_output_folder(args.out.parent, "--out's folder")
    return args, argv[split + 1 :]


def main(argv: list[str] | None = None) -> None:
    args, bench_args = parse_args(sys.argv[1:] if argv is None else argv)
    inside = git(Path.cwd(), "rev-parse", "--show-toplevel", check=False)
    if inside.returncode != 0:
        raise UserError(f"{Path.cwd()} is not in a git checkout; run bench_against.py in one")
    top = Path(inside.stdout.strip())
    before = commit_of(top, args.rev)
    kept = read_jsonl(args.out, "bench log") if args.out and args.out.exists() else []
    commits = {"before": before, "after": tree_commit(top)}
    scratch = Path(tempfile.mkdtemp(prefix="bench-against-"))
    worktree = scratch / before
    git(top, "worktree", "add", "--detach", "--quiet", str(worktree), before)
    try:
        if not (worktree / "bench.py").exists():
            raise UserError(f"{args.rev} has no bench.py to time")
        folders = {"before": worktree, "after": top}
        records = []
        for round_number in range(1, args.rounds + 1):
            for arm in round_order(round_number):
                result = run_bench(folders[arm], bench_args, arm)
                record = {"arm": arm, "round": round_number, "commit": commits[arm], **result}
                records.append(record)
                print(json.dumps(record), flush=True)
                if args.out:
                    write_jsonl([*kept, *records], args.out)
        print(table(records), file=sys.stderr)
    finally:  # a worktree git cannot remove is deleted, and then forgotten by prune
        git(top, "worktree", "remove", "--force", str(worktree), check=False)
        shutil.rmtree(scratch, ignore_errors=True)
        git(top, "worktree", "prune", check=False)


if __name__ == "__main__":
    exit_on_user_error(main)
