import sys, statistics
sys.path.insert(0, "/work/main/bench")
from benchlib.proxies import SQUID, WARDEN, ProxySpec
from benchlib.scenarios import FULL_MATRIX
from benchlib.session import bench_session
from run import measure_run
PY = "/work/main/.venv/bin/python"
def proto_argv(env, port, extra):
    return [PY, "/tmp/proto/fast.py", str(port)]
PROTO = ProxySpec("proto", proto_argv)
UVP = ProxySpec("proto-uv", lambda e,p,x: [PY, "/tmp/proto/fast.py", str(p), "uv"])
names = sys.argv[1].split(",")
specs = {"proto": PROTO, "squid": SQUID, "warden": WARDEN}
use = [specs[n] for n in sys.argv[2].split(",")]
with bench_session() as sess:
    for sc in [s for s in FULL_MATRIX if s.name in names]:
        for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2):
            for spec in use:
                rec = measure_run(sess.procs, sess.lg, sess.env, spec, sc, rnd, 3.0, 0.5)
                print(sc.name, spec.name, rnd, round(rec.result.rps,1), "p99", rec.result.p99_ms, "cpu/1k", round(rec.cpu_s_per_1k,3), "err", rec.result.errors, flush=True)
