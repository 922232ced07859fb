"""`python -m pyturbo.bench`: stock llama.cpp vs pyturbo's pipelined prefill, measured in one process.

cli      the options and their checks, main()
layout   the default layout chosen from the machine, and why
measure  the settings measured per prompt length, interleaved runs, the rows
report   the table and its legend, the files (written atomically, after the table is printed), the plots
run      one run from start to end
"""
from .cli import main, parse_args
from .layout import default_setup
from .measure import PIPELINE_MODES, STOCK_BATCH, STOCK_UBATCH, Row, Setting, plan, round_order
from .report import TABLE_COLUMNS, columns, legend, table

__all__ = ["main", "parse_args", "default_setup", "PIPELINE_MODES", "STOCK_BATCH", "STOCK_UBATCH", "Row", "Setting",
           "plan", "round_order", "TABLE_COLUMNS", "columns", "legend", "table"]
