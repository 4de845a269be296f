#!/bin/bash
# Device sweep: MQAR-8 calibration, one process per config, all on the GPU at once.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-index .sweep/whl/*.whl > $OUT/whl.log 2>&1; python3 -m pip install -q --no-deps --no-build-isolation --no-index . > $OUT/install.log 2>&1 || { echo "install failed"; tail -20 $OUT/install.log; }
R=$PWD; cd /tmp
S=${STEPS:-2500}
run(){ name=$1; shift; timeout ${LIMIT:-330} python3 $R/.sweep/calib.py "$@" --device cuda --steps $S --eval_every 100 > $OUT/logs/$name.log 2>&1 & }
mkdir -p $OUT/logs
F=$R/recipes/full.yaml; T=$R/recipes/transformer.yaml; U="--set tie_embeddings=false"
run t6_untied_3e3 $T --lr 3e-3 $U
run t6_untied_1e3 $T --lr 1e-3 $U
run t2_untied_3e3 $T --lr 3e-3 $U --set n_blocks=2
run t6_tied_3e3 $T --lr 3e-3
run t6_untied_std1_3e3 $T --lr 3e-3 $U --set init_std=1.0
run h_untied_3e3 $F --lr 3e-3 $U
run h_untied_1e3 $F --lr 1e-3 $U
run h_tied_3e3 $F --lr 3e-3
run h_untied_sgaLS1 $F --lr 3e-3 $U --set components.sga.layerscale=1.0
run h_untied_nobudget $F --lr 3e-3 $U --set components.router.args='{"budget_weight":0.0}'
run h_untied_win32 $F --lr 3e-3 $U --set components.sga.args='{"n_heads":4,"window":32,"max_global":32,"globals_per_chunk":2}'
run h_untied_glob8 $F --lr 3e-3 $U --set components.sga.args='{"n_heads":4,"window":16,"max_global":32,"globals_per_chunk":8}'
run h_untied_4blocks $F --lr 3e-3 $U --set n_blocks=4
run h_untied_norouter $F --lr 3e-3 $U --set dropped='["router"]'
run h_untied_nosga $F --lr 3e-3 $U --set dropped='["sga"]'
run h_untied_combo $F --lr 3e-3 $U --set components.sga.layerscale=1.0 --set components.router.args='{"budget_weight":0.0}' --set components.sga.args='{"n_heads":4,"window":16,"max_global":32,"globals_per_chunk":8}'
sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cd $OUT/logs; for f in *.log; do echo "== $f"; grep step $f | awk 'NR%5==0' | cut -c1-110; grep -i "error\|Traceback" $f | head -3; done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $OUT/logs
