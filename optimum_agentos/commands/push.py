"""`optimum-agentos push`: upload a checkpoint folder (model, tokenizer, card, report) to the Hub."""

from __future__ import annotations

import argparse


def add_parser(sub):
    p = sub.add_parser("push", help="Push a saved checkpoint folder to the Hugging Face Hub.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="Checkpoint folder.")
    p.add_argument("--repo-id", required=True, help="Target repository, e.g. me/smollm2-int4.")
    p.add_argument("--private", action="store_true", help="Create the repository private.")
    p.add_argument("--revision", default=None, help="Branch to push to (created if missing).")
    p.add_argument("--commit-message", default=None)
    return p


def run(args) -> dict:
    from ..hub.card import refresh_card
    from ..hub.push import check_credentials, push_folder

    token = check_credentials()  # before anything changes, locally or remotely
    refresh_card(args.folder, repo_id=args.repo_id) if _is_agentos(args.folder) else None
    url = push_folder(args.folder, args.repo_id, token=token, private=args.private, revision=args.revision,
                      commit_message=args.commit_message)
    return {"repo_id": args.repo_id, "commit": url}


def _is_agentos(folder) -> bool:
    from pathlib import Path

    from ..hub.card import CARD_INFO

    return Path(folder, CARD_INFO).is_file()
