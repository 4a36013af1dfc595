"""`vlmtune study ...`: a blind A/B human preference study whose votes become preference pairs.

    vlmtune study create --db s.sqlite --name traffic --data pairs.jsonl --a base.jsonl --b tuned.jsonl
    vlmtune study raters add --db s.sqlite alice        # prints alice's personal link
    vlmtune study serve --db s.sqlite                   # http://127.0.0.1:8000
    vlmtune study results --db s.sqlite
    vlmtune study export --db s.sqlite --out human_pairs.jsonl
"""

from __future__ import annotations

import argparse
from contextlib import closing
import ipaddress
import json
import sys

from vlmtune.cli.model import add_loader, add_trust_remote_code

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_commands(commands: argparse._SubParsersAction) -> None:
    study = commands.add_parser("study", help="blind A/B human preference study (web app, SQLite)")
    sub = study.add_subparsers(dest="study_command", metavar="STUDY_COMMAND", required=True)

    p = sub.add_parser("create", help="store both models' answers to every record in a new study file")
    _db(p)
    p.add_argument("--name", required=True, help="the study's name, shown to raters")
    p.add_argument("--data", required=True, help="preference data file (any format `vlmtune data` reads)")
    p.add_argument("--a", required=True, help="model A: a `vlmtune infer` answers JSONL, or a model to generate with")
    p.add_argument("--b", required=True, help="model B: same as --a")
    p.add_argument("--a-adapter", help="training run or adapter folder to load on model A")
    p.add_argument("--b-adapter", help="training run or adapter folder to load on model B")
    p.add_argument("--images-root", metavar="DIR",
                   help="the only folder the study serves images from (default: the common folder of the "
                   "records' images, printed); records with images outside it are refused")
    p.add_argument("--raters-per-item", type=int, default=3, help="ratings wanted per item (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="when generating (default 128)")
    p.add_argument("--batch-size", type=int, default=4, help="when generating (default 4)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records / missing answers and report them")
    add_loader(p)
    add_trust_remote_code(p)
    _base_url(p)
    p.set_defaults(func=_create)

    p = sub.add_parser("serve", help="run the study's web app")
    _db(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.set_defaults(func=_serve)

    raters = sub.add_parser("raters", help="add or list raters")
    raters_sub = raters.add_subparsers(dest="raters_command", metavar="RATERS_COMMAND", required=True)
    p = raters_sub.add_parser("add", help="add a rater and print their personal link")
    _db(p)
    p.add_argument("name", help="the rater's name (unique in the study)")
    _base_url(p)
    p.set_defaults(func=_raters_add)
    p = raters_sub.add_parser("list", help="list raters with their links and vote counts")
    _db(p)
    _base_url(p)
    p.set_defaults(func=_raters_list)

    p = sub.add_parser("admin-link", help="print the admin link (live progress and results)")
    _db(p)
    _base_url(p)
    p.set_defaults(func=_admin_link)

    p = sub.add_parser("results", help="win rate of B over A with 95%% CIs, agreement, per category")
    _db(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_results)

    p = sub.add_parser("export", help="votes -> preference records (chosen = preferred answer)")
    _db(p)
    p.add_argument("--out", required=True, help="output file (.jsonl or .json)")
    p.add_argument("--format", default="vlmtune", help="output format (default vlmtune, what `vlmtune train` reads)")
    p.add_argument("--per-vote", action="store_true", help="one record per A/B vote instead of the majority per item")
    p.set_defaults(func=_export)


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="the study's SQLite file")


def _base_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"where raters reach the server, for printed links (default {DEFAULT_BASE_URL})")


def _create(args: argparse.Namespace) -> int:
    from vlmtune.study import db
    from vlmtune.study.create import build_study, generate_with_model

    def generate_answers(model, adapter, records):
        return generate_with_model(model, adapter, records, args.max_new_tokens, args.batch_size,
                                   loader=args.loader, trust_remote_code=args.trust_remote_code)

    admin_token, n_items = build_study(
        args.db, args.name, args.data, args.a, args.b, args.raters_per_item,
        args.a_adapter, args.b_adapter, args.skip_bad, generate_answers, args.images_root,
    )
    with closing(db.connect(args.db)) as conn:
        root = db.study_info(conn)["data_root"]
    print(f"created study {args.name!r} in {args.db}: {n_items} items, {args.raters_per_item} raters per item")
    how = "--images-root" if args.images_root else "the common folder of the records' images; --images-root sets it"
    print(f"images served from {root} ({how})")
    print(f"admin link: {args.base_url.rstrip('/')}/admin/{admin_token}")
    print(f"next: vlmtune study raters add --db {args.db} NAME")
    return 0


def bind_warning(host: str) -> str | None:
    """A warning when the server would be reachable from other machines."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"warning: binding to {host} makes the study reachable from other machines; anyone with "
            "a link can vote. Use it only on a network you trust (no TLS here).")


def _serve(args: argparse.Namespace) -> int:
    warning = bind_warning(args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    from vlmtune.study import db
    from vlmtune.study.app import bind, serve

    db.connect(args.db).close()  # a missing or foreign file fails here, before "serving"
    sock = bind(args.host, args.port)  # a busy port fails here too
    port = sock.getsockname()[1]
    print(f"serving the study in {args.db} at http://{args.host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
    serve(args.db, sock)
    return 0


def _raters_add(args: argparse.Namespace) -> int:
    from vlmtune.study import db

    with closing(db.connect(args.db)) as conn:
        rater = db.add_rater(conn, args.name)
    print(f"{rater.name}: {args.base_url.rstrip('/')}/r/{rater.token}")
    return 0


def _raters_list(args: argparse.Namespace) -> int:
    from vlmtune.study import db

    with closing(db.connect(args.db)) as conn:
        raters = db.raters_with_votes(conn)
    for rater, n in raters:
        print(f"{rater.name}: {n} votes  {args.base_url.rstrip('/')}/r/{rater.token}")
    return 0


def _admin_link(args: argparse.Namespace) -> int:
    from vlmtune.study import db

    with closing(db.connect(args.db)) as conn:
        token = db.study_info(conn)["admin_token"]
    print(f"{args.base_url.rstrip('/')}/admin/{token}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from vlmtune.study import db
    from vlmtune.study.summary import format_results, results_dict, summarize

    with closing(db.connect(args.db)) as conn:
        info = db.study_info(conn)
        results = summarize(db.load_votes(conn), int(info["raters_per_item"]))
    if args.json:
        print(json.dumps(results_dict(results), indent=2))
    else:
        print(f"A = {info['model_a']}\nB = {info['model_b']}")
        print(format_results(results, info["name"]))
    return 0


def _export(args: argparse.Namespace) -> int:
    from vlmtune.data.writers import write_records
    from vlmtune.study import db
    from vlmtune.study.export import export_pairs

    with closing(db.connect(args.db)) as conn:
        records, summary = export_pairs(conn, per_vote=args.per_vote)
    write_records(records, args.out, args.format)
    print(f"{summary.describe()}; wrote {args.out}")
    return 0
