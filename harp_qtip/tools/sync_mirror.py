"""Copy the files harp_qtip shares with harp_quip (tests/test_mirror.py's MIRRORED and RENAMED)
from harp_quip, byte for byte. harp_quip holds the source of truth: edit there, then

    python tools/sync_mirror.py            # from harp_qtip; --check only reports
"""
import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[1]


def mirrored():
    spec = importlib.util.spec_from_file_location("test_mirror", BACKEND / "tests" / "test_mirror.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mirrored_pairs()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="list the differing files, copy nothing")
    args = parser.parse_args(argv)
    pairs = mirrored()
    differing = [(ours, theirs) for ours, theirs in pairs
                 if not ours.is_file() or ours.read_bytes() != theirs.read_bytes()]
    for ours, theirs in differing:
        print(("differs: " if args.check else "copied:  ") + str(ours.relative_to(BACKEND)))
        if not args.check:
            ours.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(theirs, ours)
    if not differing:
        print(f"all {len(pairs)} mirrored files are identical")
    return 1 if args.check and differing else 0


if __name__ == "__main__":
    sys.exit(main())
