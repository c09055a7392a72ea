"""The training stream through the Python clients a user would pick, against a real server.

    cargo build --release --bin lakegate
    python benches/clients.py --lake /tmp/lake1m --server-bin target/release/lakegate --pin

Starts `lakegate demo` on the lake (loopback, any free port), then reads alice's training
stream with `pyarrow.flight` (gRPC C++) and with the ADBC Flight SQL driver (gRPC-Go), one
warm-up and N timed runs each, alternating, and prints per client the median wall time, the
client's own CPU (this process, every thread) and the bytes of Arrow data received. With
`--pin` the server runs on CPU 0 and this process on CPU 1, as `lakegate-bench --pin` does.
Needs the interop requirements (`tests/interop/requirements.txt`).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as flight

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "interop"))
from flightsql_command import statement_query  # noqa: E402

TRAINING_STREAM = (
    "SELECT patient_id, start_time, encounter_class, total_cost FROM clinical.encounters"
)


def read_pyarrow(address: str, user: str, sql: str) -> int:
    client = flight.FlightClient(f"grpc://{address}")
    header = client.authenticate_basic_token(user, f"demo-{user}")
    options = flight.FlightCallOptions(headers=[header])
    descriptor = flight.FlightDescriptor.for_command(statement_query(sql))
    info = client.get_flight_info(descriptor, options)
    table = client.do_get(info.endpoints[0].ticket, options).read_all()
    client.close()
    return table.nbytes


def read_adbc(address: str, user: str, sql: str) -> int:
    conn = flightsql.connect(
        f"grpc://{address}", db_kwargs={"username": user, "password": f"demo-{user}"}
    )
    cur = conn.cursor()
    cur.execute(sql)
    nbytes = 0
    for batch in cur.fetch_record_batch():
        nbytes += batch.nbytes
    cur.close()
    conn.close()
    return nbytes


CLIENTS = {"pyarrow.flight (gRPC C++)": read_pyarrow, "ADBC Flight SQL (gRPC-Go)": read_adbc}


def start_server(server_bin: str, lake: str, pin: bool):
    log = tempfile.NamedTemporaryFile(prefix="lakegate-clients-", suffix=".log", delete=False)
    cmd = [server_bin, "demo", "--lake", lake, "--port", "0"]
    if pin:
        cmd = ["taskset", "-c", "0"] + cmd
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        text = open(log.name).read()
        m = re.search(r"grpc://([0-9.]+:[0-9]+)", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            sys.exit(f"the server exited before listening:\n{text[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not listen within 2 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True)
    parser.add_argument("--server-bin", default="target/release/lakegate")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--user", default="alice")
    parser.add_argument("--pin", action="store_true")
    args = parser.parse_args()

    if args.pin:
        os.sched_setaffinity(0, {1})
    proc, address = start_server(args.server_bin, args.lake, args.pin)
    try:
        runs = {name: [] for name in CLIENTS}
        for name, read in CLIENTS.items():  # warm-up
            read(address, args.user, TRAINING_STREAM)
        for _ in range(args.iterations):
            for name, read in CLIENTS.items():
                cpu0, wall0 = time.process_time(), time.perf_counter()
                nbytes = read(address, args.user, TRAINING_STREAM)
                wall = time.perf_counter() - wall0
                runs[name].append((wall * 1e3, (time.process_time() - cpu0) * 1e3, nbytes))
        print(f"training_stream as {args.user}, median of {args.iterations}"
              f"{', pinned' if args.pin else ''}")
        print(f"{'client':28} {'wall_ms':>9} {'client_cpu_ms':>14} {'MB':>8} {'MB/s':>8}")
        for name, rs in runs.items():
            wall = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[1] for r in rs)
            mb = rs[0][2] / 1e6
            print(f"{name:28} {wall:9.1f} {cpu:14.1f} {mb:8.1f} {mb / wall * 1e3:8.1f}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
