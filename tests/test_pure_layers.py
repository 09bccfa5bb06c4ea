"""The pure layers (storage, layout, transform, convert, config, parameter tables) never import
MindSpore: planning a 7B checkpoint must stay fast and testable without it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import sys, tempfile, os
import mindformers_st.storage.reader, mindformers_st.storage.writer, mindformers_st.storage.index
import mindformers_st.layout.parallel_config, mindformers_st.layout.owners, mindformers_st.layout.strategy
import mindformers_st.transform.sources, mindformers_st.transform.planner, mindformers_st.transform.execute
import mindformers_st.convert, mindformers_st.config
import mindformers_st.models.param_table, mindformers_st.models.config
from mindformers_st.layout.parallel_config import ParallelConfig, plan_layouts
from mindformers_st.layout.strategy import read_strategy, write_strategy_file
from mindformers_st.models.config import LlamaConfig
from mindformers_st.models.param_table import llama_param_table
cfg = LlamaConfig.from_dict(dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                                 intermediate_size=11008))
lay = plan_layouts(llama_param_table(cfg), ParallelConfig(data_parallel=2, model_parallel=4))
path = os.path.join(tempfile.mkdtemp(), "s.ckpt")
write_strategy_file(path, lay)
read_strategy(path)
print("mindspore" in sys.modules)
"""


def test_pure_layers_plan_a_7b_strategy_without_importing_mindspore():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
