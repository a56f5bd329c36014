"""`optimum-agentos card`: (re-)render a checkpoint folder's model card, with an eval report's table and plot."""

from __future__ import annotations

import argparse


def add_parser(sub):
    p = sub.add_parser("card", help="Re-render a checkpoint folder's README.md (model card).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="Checkpoint folder.")
    p.add_argument("--report", default=None, help="Report folder from `optimum-agentos eval` to put in the card.")
    p.add_argument("--report-model", default=None, help="Which model of the report this folder is (default: first).")
    p.add_argument("--repo-id", default=None, help="Hub repo id shown in the card's loading snippet.")
    return p


def run(args) -> dict:
    from ..hub.card import refresh_card

    path = refresh_card(args.folder, args.report, args.report_model, args.repo_id)
    return {"card": str(path)}
