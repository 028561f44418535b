"""Replace rows of an earlier `halfstep eval` JSON with the same rows of a later eval.

    python scripts/replace_eval_rows.py EARLIER.json LATER.json student:1,student:2 \
        [--out EARLIER.json] [--plot quality.png]

For a table whose unchanged rows (the teacher's, hours of CPU) need not be sampled again when
some students change. It refuses unless both evals measured the same way: the same settings,
and every row both scored and that is not replaced (the real-data floor at least) agrees within
1e-4, which another machine's classifier does not (halfstep.eval.merge). Grids are not merged:
copy the later eval's PNGs for the replaced step counts.
"""

import argparse
import json
import sys
from pathlib import Path

from halfstep.eval.merge import parse_row_names, replace_rows
from halfstep.eval.report import check_targets, format_table, format_targets, plot, write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("earlier")
    parser.add_argument("later")
    parser.add_argument("rows", help="rows to take from LATER, e.g. student:1,student:2")
    parser.add_argument("--out", help="where to write the merged JSON (default: EARLIER)")
    parser.add_argument("--plot", help="also redraw the quality-vs-steps PNG here")
    args = parser.parse_args()
    try:
        base, new = (json.loads(Path(path).read_text()) for path in (args.earlier, args.later))
        merged = replace_rows(base, new, parse_row_names(args.rows), args.later)
    except (OSError, ValueError) as exc:  # unreadable, not JSON, or MergeError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError) as exc:  # a row without method, steps or metrics
        print(f"error: not a `halfstep eval --json` file: bad or missing {exc}", file=sys.stderr)
        return 2
    print(format_table(merged))
    print(format_targets(check_targets(merged)))
    print(f"wrote {write_json(merged, args.out or args.earlier)}")
    if args.plot:
        print(f"wrote {plot(merged, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
