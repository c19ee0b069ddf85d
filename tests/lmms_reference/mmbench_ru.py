# ruff: noqa
"""lmms-eval's own MMBench-ru functions, copied verbatim: the reference the tests compare against.

Source: EvolvingLMMs-Lab/lmms-eval at commit 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3
(lmms-eval 0.7.2):
- ``lmms_eval/tasks/mmbench/mmbench_evals.py``: the methods of ``MMBench_Evaluator`` below
  (``__init__``, ``create_options_prompt``, ``build_choices``, ``can_infer_option``,
  ``can_infer_text``, ``can_infer``, ``prefetch_answer``), unchanged;
- ``lmms_eval/tasks/mmbench/ru_utils.py``: ``mmbench_doc_to_text`` and
  ``mmbench_process_results``, unchanged;
- ``lmms_eval/tasks/mmbench/_default_template_mmbench_ru_yaml``: ``POST_PROMPT``;
  ``lmms_eval/tasks/mmbench/mmbench.yaml``: ``metadata.sys_prompt``.
Copyright (c) 2025 LMMs-Lab, Apache License 2.0 (the license lmms-eval applies to its
``lmms_eval/tasks`` and ``lmms_eval/models`` folders: http://www.apache.org/licenses/LICENSE-2.0).

Not verbatim, and marked so: the imports (loguru's logger replaced by ``logging``), the module
instance built with the yaml's ``sys_prompt``, and ``lmms_prefetch``, which runs one answer
through the path ``mmbench_ru_dev`` takes (``mmbench_process_results``, then the table that
``eval_result`` builds, its lines copied verbatim, then ``prefetch_answer``).
Test-only: nothing outside ``tests/`` imports it.
"""

import logging
import os
import string

import pandas as pd

eval_logger = logging.getLogger("lmms_reference")

SYS_PROMPT = "There are several options:"
POST_PROMPT = "\nВыбери правильный вариант ответа буквой."


class MMBench_Evaluator:
    def __init__(self, sys_prompt="There are several options:", API_KEY="", API_URL="", model_version="gpt-3.5-turbo-0613"):
        self.sys_prompt = sys_prompt
        self.model_version = model_version
        self.API_KEY = API_KEY
        self.API_URL = API_URL
        self.API_TYPE = os.getenv("API_TYPE", "openai")

    def create_options_prompt(self, row_data, option_candidate):
        available_keys = set(row_data.keys()) & set(option_candidate)
        options = {cand: row_data[cand] for cand in available_keys if row_data[cand]}
        sorted_options = dict(sorted(options.items()))
        options_prompt = f"{self.sys_prompt}\n"
        for key, item in sorted_options.items():
            if pd.notna(item) and item != "nan":
                options_prompt += f"{key}. {item}\n"
        return options_prompt.rstrip("\n"), sorted_options

    def build_choices(self, item):
        ret = {}
        for ch in "ABCD":
            if not pd.isna(item[ch]):
                ret[ch] = item[ch]
        return ret

    def can_infer_option(self, answer, num_choice=5):
        choices = string.ascii_uppercase[:num_choice]
        if "Failed to obtain answer via API" in answer:
            return False

        def count(splits, choices="ABCD", prefix="", suffix=""):
            cnt = 0
            for c in choices:
                if prefix + c + suffix in splits:
                    cnt += 1
            return cnt

        splits = [x.strip() for x in answer.split()]
        if count(splits, choices) == 1:
            for ch in choices:
                if "A" in splits and len(splits) > 3:
                    eval_logger.info(f"A might be a quantifier in the string: {answer}.")
                    break
                if ch in splits:
                    return ch
        tups = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ").")]
        for tup in tups:
            if count(splits, choices, prefix=tup[0], suffix=tup[1]) == 1:
                for ch in choices:
                    if tup[0] + ch + tup[1] in splits:
                        return ch
        return False

    def can_infer_text(self, answer, choices):
        answer = answer.lower()
        assert isinstance(choices, dict)
        for k in choices:
            assert k in "ABCD"
            choices[k] = str(choices[k]).lower()
        cands = []
        for k in choices:
            if choices[k] in answer:
                cands.append(k)
        if len(cands) == 1:
            return cands[0]
        return False

    def can_infer(self, answer, choices):
        copt = self.can_infer_option(answer)
        return copt if copt else self.can_infer_text(answer, choices)

    def prefetch_answer(self, item):
        choices = self.build_choices(item)
        return self.can_infer(item["prediction"], choices)


mmbench_evaluator = MMBench_Evaluator(sys_prompt=SYS_PROMPT)


def mmbench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    option_candidate = ["A", "B", "C", "D", "E"]
    options_prompt, options_dict = mmbench_evaluator.create_options_prompt(doc, option_candidate)

    data = {
        # "img": doc["image"],
        "question": doc["question"],
        "answer": doc.get("answer", None),
        "options": options_prompt,
        "category": doc["category"],
        "L2-category": doc["l2-category"],
        "options_dict": options_dict,
        "index": doc["index"],
        "hint": doc["hint"],
        "source": doc["source"],
        "split": doc["split"],
    }

    query_prompt = f"{data['hint']} {data['question']} {data['options']}" if pd.notna(data["hint"]) and data["hint"] != "nan" else f"{data['question']} {data['options']}"

    if lmms_eval_specific_kwargs:
        query_prompt = f"{query_prompt}\n{lmms_eval_specific_kwargs['post_prompt']}"

    return query_prompt


def mmbench_process_results(doc, results):
    model_response = results[0].strip()
    data = {
        "gpt_eval_score": {
            "index": doc["index"],
            "question": doc["question"],
            "answer": doc["answer"],
            "prediction": model_response,
            "hint": doc["hint"],
            "source": doc["source"],
            "split": doc["split"],
            "category": doc["category"],
            "L2-category": doc["l2-category"],
        },
        "submission": {
            "index": doc["index"],
            "question": doc["question"],
            "answer": doc["answer"],
            "prediction": model_response,
            "hint": doc["hint"],
            "source": doc["source"],
            "split": doc["split"],
            "category": doc["category"],
            "L2-category": doc["l2-category"],
        },
    }
    option_candidate = ["A", "B", "C", "D", "E"]
    for c in option_candidate:
        data["submission"][c] = doc.get(c, "nan")
        data["gpt_eval_score"][c] = doc.get(c, "nan")
    return data


def lmms_prefetch(doc, prediction):
    """(not verbatim) What ``mmbench_ru_dev`` reads from one raw answer before any judge:
    a letter, or False where lmms-eval would ask its GPT judge."""
    results = [mmbench_process_results(doc, [prediction])["gpt_eval_score"]]
    data = pd.DataFrame(results)
    data = data.sort_values(by="index")
    data["prediction"] = [str(x) for x in data["prediction"]]
    for k in data.keys():
        data[k.lower() if k not in "ABCD" else k] = data.pop(k)

    return mmbench_evaluator.prefetch_answer(data.iloc[0])


def lmms_prompt(doc):
    """(not verbatim) The text ``mmbench_ru_dev`` gives the model for ``doc``."""
    return mmbench_doc_to_text(doc, {"pre_prompt": "", "post_prompt": POST_PROMPT})
