"""Flat-region check: does the model leave a periodic texture on smooth regions? (issue 14, per relay run)

    python benchmarks/flat_region.py --checkpoint default

A synthetic sky: a smooth vertical gradient (each row constant), 256x256, clean and with uniform synthetic haze
(moceir.data.degradations.add_haze, constant depth). Restored with context_pad 0 and 16. The residual texture is
the standard deviation of the horizontal high-pass (x[:, 1:] - x[:, :-1]) of the output, on rows that should be
constant, in 8-bit grey levels; the clean input has 0. Also the mean brightness change, and the brightness error: the
output's mean minus the clean sky's. The clean sky is the target of both inputs, so for the hazy sky a darkening of
about 17 levels is right (removing the haze) and the error, not the change, says how far off the output is.
"""

import argparse

import numpy as np

import moceir
from moceir.data.degradations import add_haze


def sky(h: int = 256, w: int = 256) -> np.ndarray:
    top, bottom = np.array([0.45, 0.62, 0.85]), np.array([0.80, 0.86, 0.92])
    t = np.linspace(0, 1, h)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.float32)


def texture_levels(img: np.ndarray) -> float:
    """Std of the horizontal first difference, in 8-bit levels (0 for rows that are constant)."""
    return float(np.diff(img, axis=1).std() * 255)


def flat_region_rows(model: moceir.MoCEIR) -> list[dict]:
    """The check's rows: input, context_pad, texture of input and output, mean change and error vs the clean sky.

    All in 8-bit levels. ``mean_change`` = output mean - input mean; ``mean_error`` = output mean - clean sky mean
    (the target of both inputs; equal to the change for the clean sky).
    """
    clean = sky()
    hazy = add_haze(clean, np.full(clean.shape[:2], 0.5, np.float32), beta=1.2, airlight=0.9).astype(np.float32)
    rows = []
    for name, img in (("clean sky", clean), ("hazy sky", hazy)):
        for pad in (0, 16):
            out = moceir.restore(model, img, context_pad=pad)
            rows.append({"input": name, "context_pad": pad, "texture_in": texture_levels(img),
                         "texture_out": texture_levels(out), "mean_change": float((out.mean() - img.mean()) * 255),
                         "mean_error": float((out.mean() - clean.mean()) * 255)})
    return rows


def flat_region_table(rows: list[dict]) -> list[str]:
    """flat_region_rows() as markdown table lines (also scripts/evaluate_relay.py's, from a judgement.json)."""
    return ["| input | context_pad | texture of the input (levels) | texture of the output (levels) | mean change | "
            "error vs the clean sky |", "|---|---|---|---|---|---|",
            *(f"| {r['input']} | {r['context_pad']} | {r['texture_in']:.2f} | {r['texture_out']:.2f} | "
              f"{r['mean_change']:+.1f} | {r['mean_error']:+.1f} |" for r in rows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="default")
    a = p.parse_args()
    print("\n".join(flat_region_table(flat_region_rows(moceir.load_model(a.checkpoint)))))


if __name__ == "__main__":
    main()
