"""Upload a trained artifact folder (an M2PT adapter, a PEFT LoRA adapter or a fully fine-tuned model folder, with the
model card training wrote into it) to a Hugging Face Hub model repo, as one commit.

    python -m pipeline.push out/default/adapter my-user/m2pt-demo
    python -m pipeline.push runs/m2pt/adapter my-org/llava-m2pt --private

The folder is checked first (it must be an artifact this pipeline reads back), then the token and the Hub (one line
saying what is missing: `hf auth login` or HF_TOKEN; HF_HUB_OFFLINE must be unset), then it is uploaded through
huggingface_hub's `upload_folder`. Anyone can then use it by repo id: `--adapter my-user/m2pt-demo` in
pipeline.evaluate / pipeline.chat, `--adapters my-user/m2pt-demo` in pipeline.serve, `load_artifact(base, REPO)`.
Training does the same at its end with `--push_to_hub REPO`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import UsageError


def parse_args(argv=None):
    from pipeline.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    ap.add_argument("folder", type=Path, help="the artifact folder (a run's OUTPUT/adapter)")
    ap.add_argument("repo", help="the Hub model repo to upload to, user/name (created if missing)")
    ap.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                    "visibility)")
    ap.add_argument("--message", default=None, help="the commit message (default: 'Upload FOLDER from the M2PT "
                    "pipeline')")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from pipeline.core import hub
    from pipeline.core.methods import read_artifact

    args = parse_args(argv)
    try:
        if not args.folder.is_dir():
            raise UsageError(f"{args.folder}: no such folder")
        artifact = read_artifact(args.folder)  # a folder this pipeline cannot read back is not worth uploading
        user = hub.check_can_push(args.repo)
        print(f"pushing the {artifact.method.name} artifact in {args.folder} to {args.repo} as {user}",
              file=sys.stderr, flush=True)
        url = hub.push(args.folder, args.repo, private=args.private, message=args.message)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except hub.PushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
