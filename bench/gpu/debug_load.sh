set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
PYTURBO_CUDA=OFF python3 -m pip install --no-build-isolation --no-index --no-deps . > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
cat > /tmp/t.py <<'PY'
import pyturbo, numpy as np, logging
logging.basicConfig(level=logging.DEBUG)
from pyturbo import synth
p = synth.write_model('/tmp/tiny.gguf', synth.PRESETS['tiny'])
m = pyturbo.Model(p); print("LOADED", m.devices, flush=True)
PY
python3 /tmp/t.py 2>&1 | tail -30
which cuda-gdb && cuda-gdb -batch -ex run -ex bt --args python3 /tmp/t.py 2>&1 | grep -A30 "SIGSEGV" | head -40
