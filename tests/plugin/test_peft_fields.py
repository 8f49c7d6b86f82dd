"""A peft adapter_config.json that sets what a peftlab adapter cannot represent is refused, naming
the field; peft's ways of writing "unset" pass."""

import pytest
import torch

from peftlab import ValidationError, load_host
from peftlab.toolkit import refuse_peft_fields

HOST = load_host()


def test_a_field_off_its_plain_value_is_refused_and_unset_spellings_pass():
    plain = {"bias": "none", "modules_to_save": None}
    refuse_peft_fields({"bias": "none", "modules_to_save": []}, plain, "X")
    refuse_peft_fields({}, plain, "X")
    with pytest.raises(ValidationError, match=r"adapter_config.bias='all'.*'none': peftlab's X does not have it$"):
        refuse_peft_fields({"bias": "all"}, plain, "X")
    with pytest.raises(ValidationError, match="modules_to_save"):
        refuse_peft_fields({"modules_to_save": {}}, plain, "X")  # {} is unset only where the caller says so
    refuse_peft_fields({"modules_to_save": {}}, plain, "X", absent=(None, [], {}))
    with pytest.raises(ValidationError, match=r"does not have it \(because\)"):
        refuse_peft_fields({"bias": "all"}, plain, "X", why={"bias": " (because)"})


@pytest.mark.parametrize("adapter,field,value", [("lora", "rank_pattern", {"q_proj": 4}), ("dora", "use_rslora", True),
                                                 ("vera", "layers_to_transform", [0]), ("oft", "module_dropout", 0.1)])
def test_each_peft_adapter_refuses_what_it_cannot_represent(adapter, field, value):
    cls = HOST.adapters.get(adapter).factory
    model = torch.nn.Linear(4, 4)
    config = {"r": 4, "oft_block_size": 2, "use_dora": adapter == "dora", field: value}
    with pytest.raises(ValidationError, match=f"adapter_config.{field}"):
        cls.settings_from_peft(config, model)
