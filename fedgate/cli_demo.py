"""`fedgate demo`: one command for a whole federated run on real data."""

from __future__ import annotations

import argparse
import signal


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a full federated training on real data on this machine",
                       description="Start a broker, the aggregator and one gateway agent per unit "
                       "of the data set; run R rounds; print per-round results and the "
                       "centralized and local-only baselines.")
    p.add_argument("--dataset", default="wind",
                   help="wind (default), batteries, synthetic, or csv:FILE")
    p.add_argument("--gateways", type=int, default=0,
                   help="number of gateways (default: one per unit; wind: 4, or 8 = turbine x year)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", help="write the run record (JSON) here")
    p.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one")
    p.add_argument("--workdir", help="folder for configs, logs and state (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rows-per-unit", type=int, default=0,
                   help="subsample each unit (fast smoke runs)")
    p.add_argument("--fusion", default="fedavg", help="fusion rule (fedavg, median, trimmed_mean, krum, ...)")
    p.add_argument("--server-optimizer", default="fedavg", choices=("fedavg", "fedavgm", "fedadam"))
    p.add_argument("--compress", default="",
                   help="gateway update compression, e.g. topk:0.01,int8,zstd")
    p.add_argument("--downlink", default="fp32", choices=("fp32", "int8", "delta"),
                   help="how the global model travels to gateways: fp32, int8 (float master kept "
                   "on the aggregator) or delta (int8 delta on the previous version)")
    p.add_argument("--dp-epsilon", type=float, default=0.0,
                   help="differential privacy: each gateway's (epsilon, 1e-5) budget over the run")
    p.add_argument("--dp-level", default="update", choices=("update", "record"),
                   help="what --dp-epsilon protects: a gateway's whole update (update) or each "
                   "of its sensor records, by DP-SGD in local training (record)")
    p.add_argument("--clip-norm", type=float, default=0.0,
                   help="L2 clip of each update (default 1.0 when --dp-epsilon is set)")
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware local training (int8 fake-quant)")
    p.add_argument("--inference", action="store_true",
                   help="gateways export each new model to int8 .tflite, run it in LiteRT and "
                   "publish anomaly scores on their telemetry topic")
    p.add_argument("--secure", action="store_true",
                   help="provision a fleet and run over mTLS with the generated ACL and signed "
                   "messages (needs Mosquitto)")
    p.add_argument("--attack", default="", choices=("", "sign_flip", "scale", "gaussian_noise",
                                                   "label_flip", "little_is_enough"),
                   help="attack experiments: what the malicious gateways do")
    p.add_argument("--malicious", type=float, default=0.0,
                   help="share of gateways that run --attack (e.g. 0.25)")
    p.add_argument("--metric", default="",
                   help="headline metric: any metric the task reports (default: rmse for "
                   "regression, accuracy for classification, f1_pos when the positive class "
                   "of a binary task is under 20 %% of training rows); a name the task does "
                   "not report exits 78")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--unit-column", default="", help="csv: the column naming each gateway's unit")
    p.add_argument("--target", default="", help="csv: the column to predict")
    p.add_argument("--features", default="", help="csv: comma-separated feature columns")
    p.add_argument("--task", default="", choices=("", "regression", "classification"),
                   help="csv: the learning task")
    p.add_argument("--field-bus", nargs="?", const="modbus", default="", choices=("modbus", "direct"),
                   help="wind: each gateway's rows cross a simulated Modbus turbine, a bridge and a "
                   "sample store before training; 'direct' reads the same rows from the data set "
                   "(for comparison)")
    p.add_argument("--field-bus-rows", type=int, default=5040,
                   help="rows per turbine replayed with --field-bus (default 5040 = 5 weeks: 4 of "
                   "training, 1 of test)")
    p.add_argument("--field-bus-start", type=int, default=0,
                   help="first row (record number) replayed with --field-bus")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedgate.demo import run_demo
    from fedgate.demo_configs import DemoOptions

    if args.rounds < 1:
        raise SystemExit("fedgate demo: --rounds must be at least 1")
    options = DemoOptions(
        dataset=args.dataset,
        gateways=args.gateways,
        rounds=args.rounds,
        out=args.out,
        broker=args.broker,
        workdir=args.workdir,
        seed=args.seed,
        max_rows_per_unit=args.max_rows_per_unit,
        fusion=args.fusion,
        server_optimizer=args.server_optimizer,
        timeout_s=args.timeout,
        compression=tuple(c for c in args.compress.split(",") if c),
        dp_epsilon=args.dp_epsilon,
        dp_level=args.dp_level,
        downlink=args.downlink,
        clip_norm=args.clip_norm,
        secure=args.secure,
        inference=args.inference,
        qat=args.qat,
        attack=args.attack,
        malicious=args.malicious,
        unit_column=args.unit_column,
        target=args.target,
        features=tuple(f for f in args.features.split(",") if f),
        csv_task=args.task,
        metric=args.metric,
        field_bus=args.field_bus,
        field_bus_rows=args.field_bus_rows,
        field_bus_start=args.field_bus_start,
    )
    # SIGTERM (systemd, `timeout`, CI) stops the demo like Ctrl-C: every service it started
    # is stopped, none is left behind
    signal.signal(signal.SIGTERM, _interrupt)
    run_demo(options)
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
