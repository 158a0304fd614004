"""Write a rare-event classification table derived from the shipped wind data.

The La Haute Borne SCADA rows (fedcore/datasets/data/la_haute_borne.npz, real data) carry
no failure label, so the event is derived from the turbine's own rule: ``stopped`` is 1 when
the turbine produces nothing (``P_avg <= 0``) while the wind is above cut-in (4 m/s), the
same "stopped in wind" rule the wind data set labels anomalies with. About 1 % of rows.

Features are what a gateway sees of the weather: nacelle wind speed, the sine and cosine of
the wind direction, outdoor temperature and vane angle. Power and blade pitch are left out:
the first defines the label, the second goes to ~90 degrees whenever a turbine stops.

Rows with NaN or the -273.2 degC temperature glitch are dropped. Rows stay in time order
per turbine (the CSV loader splits by blocks of consecutive rows).

    python bench/wind_stops_table.py wind-stops.csv [--rows-per-turbine N]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from fedcore.datasets.wind import CUT_IN_MS, DATA_FILE

HEADER = ["turbine", "time", "Ws_avg", "sin_Wa", "cos_Wa", "Ot_avg", "Va_avg", "stopped"]


def write_table(path: Path, rows_per_turbine: int = 0) -> dict[str, float]:
    """Write the table; returns rows and positive rate per turbine and overall."""
    stats: dict[str, float] = {}
    total = positives = 0
    with np.load(DATA_FILE) as npz, path.open("w", newline="") as f:
        columns = [str(c) for c in npz["columns"]]
        col = {name: columns.index(name) for name in ("P_avg", "Ws_avg", "Wa_avg", "Ot_avg", "Va_avg")}
        writer = csv.writer(f)
        writer.writerow(HEADER)
        turbines = sorted(k.removesuffix("_values") for k in npz.files
                          if k.endswith("_values") and not k.startswith("plant"))
        for turbine in turbines:
            v, t = npz[f"{turbine}_values"], npz[f"{turbine}_time"]
            keep = np.isfinite(v).all(axis=1) & (v[:, col["Ot_avg"]] > -273)
            v, t = v[keep], t[keep]
            if rows_per_turbine:
                v, t = v[:rows_per_turbine], t[:rows_per_turbine]
            stopped = (v[:, col["P_avg"]] <= 0) & (v[:, col["Ws_avg"]] > CUT_IN_MS)
            wa = np.radians(v[:, col["Wa_avg"]])
            for i in range(len(v)):
                writer.writerow([turbine, int(t[i]), f"{v[i, col['Ws_avg']]:.3f}", f"{np.sin(wa[i]):.5f}",
                                 f"{np.cos(wa[i]):.5f}", f"{v[i, col['Ot_avg']]:.2f}",
                                 f"{v[i, col['Va_avg']]:.2f}", int(stopped[i])])
            stats[turbine] = float(stopped.mean())
            total += len(v)
            positives += int(stopped.sum())
    stats["rows"] = float(total)
    stats["positive_rate"] = positives / total
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows-per-turbine", type=int, default=0,
                        help="keep each turbine's first N clean rows (default: all)")
    args = parser.parse_args()
    stats = write_table(args.out, args.rows_per_turbine)
    print(f"wrote {args.out}: {int(stats['rows'])} rows, positive rate {stats['positive_rate']:.4f}")


if __name__ == "__main__":
    main()
