"""What compression costs: accuracy, agreement, KL and time of settings against the unpatched model.

    import vlmcompress as vc
    from vlmcompress.evaluation import synthetic_items
    model, processor = vc.models.load("synth-onevision")
    result = vc.evaluate(model, processor, synthetic_items(per_task=10),
                         ["random-drop@0.1", "uniform-pool@0.1", "prompt-pool@0.1"],
                         scorer=vc.models.relevance_scorer())
    print(result.table()); result.write("eval-out")

The command line: ``vlmcompress-eval --model synth-onevision --keep 0.25 0.1 --out eval-out``.
"""
from .dataset import DatasetError, EvalItem, jsonl_items, normalise_answer, synthetic_items
from .methods import BASELINES, METHODS, Setting, default_settings, parse_setting
from .report import EvalResult
from .runner import evaluate

__all__ = ["BASELINES", "METHODS", "DatasetError", "EvalItem", "EvalResult", "Setting", "default_settings", "evaluate",
           "jsonl_items", "normalise_answer", "parse_setting", "synthetic_items"]
