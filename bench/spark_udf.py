"""Scoring a Spark table with the logged MLflow model (`mlflow.pyfunc.spark_udf`), checked against `finetune predict`.

Spark runs in local mode (`local[N]`, a JVM on this machine: pyspark from PyPI, `pip install -e '.[spark]'`,
and a Java runtime, Debian's `default-jre-headless`). The model is an MLflow model logged by finetune, so its
pyfunc flavour answers through the task definition; the UDF's labels and scores must equal what `finetune
predict` answers for the same rows, and the script exits 1 if they do not. It reports the set-up time (JVM and
session), the UDF's time and rows/s.

    python bench/spark_udf.py                              # MiniLM with a fresh head, logged to a temporary store
    python bench/spark_udf.py --model models:/sst2-sentiment@champion --rows 20000 --partitions 2

It is run by hand, not by the test suite: on 2 CPU cores the Spark set-up alone takes 10-20 s and one small
table 30-40 s, and pyspark is a 300 MB install (see docs/guides/evaluation.md, Scoring at scale).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from machine_info import describe_machine
from score import CHECKPOINT, model_folder, sentences


def logged_model(checkpoint: str, work: Path) -> str:
    """Log a fresh-head model of `checkpoint` as finetune does at the end of training; returns its runs:/ URI."""
    import mlflow

    from finetune.tracking.mlflow_model import build_mlflow_model

    folder = model_folder(checkpoint, work / "model", 64)
    build_mlflow_model(folder, work / "mlflow-model")
    mlflow.set_experiment("bench-spark-udf")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(work / "mlflow-model"), artifact_path="model")
    return f"runs:/{run.info.run_id}/model"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an MLflow model URI of a finetune model (default: log a fresh-head MiniLM)")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="for the default model")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if importlib.util.find_spec("pyspark") is None:
        print("pyspark is not installed: pip install -e '.[spark]'", file=sys.stderr)
        return 2
    if shutil.which("java") is None:
        print("no Java runtime: apt-get install default-jre-headless", file=sys.stderr)
        return 2
    # The Python workers Spark starts must be this interpreter, with finetune and its libraries.
    os.environ["PYSPARK_PYTHON"] = os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable

    import mlflow
    import numpy as np

    from finetune.tracking.sources import load_predictor, locate

    with tempfile.TemporaryDirectory(prefix="bench-spark-") as tmp:
        work = Path(tmp)
        if args.model is None:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        uri = args.model or logged_model(args.checkpoint, work)
        texts = sentences(args.rows)
        predictor = load_predictor(locate(uri), backend="torch")  # what `finetune predict` answers
        expected = predictor.predict(texts)

        from pyspark.sql import SparkSession

        started = time.perf_counter()
        spark = (SparkSession.builder.master(f"local[{args.partitions}]").appName("finetune-spark-udf")
                 .config("spark.ui.enabled", "false").config("spark.sql.execution.arrow.pyspark.enabled", "true")
                 .getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        setup = time.perf_counter() - started
        try:
            table = spark.createDataFrame(list(enumerate(texts)), ["id", "sentence"]).repartition(args.partitions)
            started = time.perf_counter()
            udf = mlflow.pyfunc.spark_udf(spark, uri, result_type="label string, score double", env_manager="local")
            rows = (table.withColumn("prediction", udf("sentence"))
                    .select("id", "prediction.label", "prediction.score").orderBy("id").collect())
            scoring = time.perf_counter() - started
        finally:
            spark.stop()
    labels_equal = [r["label"] for r in rows] == [a["label"] for a in expected]
    diff = float(np.max(np.abs(np.array([r["score"] for r in rows]) - np.array([a["score"] for a in expected]))))
    result = {"model": uri, "rows": len(rows), "partitions": args.partitions, "spark_setup_seconds": setup,
              "udf_seconds": scoring, "rows_per_second": len(rows) / scoring, "labels_equal": labels_equal,
              "max_score_difference": diff, "machine": describe_machine(["pyspark", "mlflow", "torch"])}
    print(f"Spark local[{args.partitions}]: set-up {setup:.1f} s; spark_udf on {len(rows)} rows {scoring:.1f} s "
          f"({result['rows_per_second']:.1f} rows/s, model loading included)")
    print(f"against finetune predict: labels {'equal' if labels_equal else 'DIFFERENT'}, "
          f"largest score difference {diff:.2e}")
    print(json.dumps(result["machine"]))
    print("command: python bench/spark_udf.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    # Rows are batched differently in Spark's Arrow batches than in one call: float32 rounding only.
    return 0 if labels_equal and diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
