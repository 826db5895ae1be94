"""One cold start, run as a script in a fresh interpreter by `sdrt.benchmarks.cold_start`:
import sdrt, load the bundle, print one JSON line with the times.

Run by path, not as a module, so that nothing of sdrt is imported before the clock starts.
"""

import json
import resource
import sys
import time

started = time.perf_counter()
import sdrt  # noqa: E402 - importing is what is measured

imported = time.perf_counter()
args = json.loads(sys.argv[1])
pipe = sdrt.Pipeline.load(
    args["bundle"], device=args["device"], verify=args["verify"], **args["options"]
)
loaded = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(
    json.dumps(
        {
            "import_s": imported - started,
            "load_s": loaded - imported,
            "load_ms": pipe.load_timings,
            "graph_cache": {
                name: getattr(engine, "graph_cache_status", {})
                for name, engine in pipe.engines.items()
            },
            # CPU time of all threads: what a busier machine stretches, not what it adds
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_mib": usage.ru_maxrss / 1024,
        }
    )
)
