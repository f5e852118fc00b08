"""Precision is chosen per machine: fp32 unless native bf16 measures faster; explicit choices obeyed."""
import numpy as np
import pytest
import torch

from core.errors import UserError
from siamese import precision as P
from engine.synthetic import make_individual, render_canonical
from siamese.embed import features_batch, model_fingerprint
from siamese.model import preprocess
from siamese.model import ModelConfig, SiameseNet


def _never(_p):
    raise AssertionError("measured where the choice does not depend on a measurement")


def test_auto_is_fp32_without_native_bf16_and_measures_nothing():
    chosen, measured = P.choose("auto", "cpu", native_bf16=False, cuda_bf16=False, measure=_never)
    assert chosen == P.Precision("fp32", channels_last=True) and measured == {}


@pytest.mark.parametrize("fp32, bf16, expect", [(30.0, 120.0, "bf16"),  # AMX-like: bf16 4x faster
                                                (30.0, 31.0, "fp32"),  # within timing noise: keep fp32
                                                (30.0, 3.0, "fp32")])  # emulated bf16
def test_auto_with_native_bf16_follows_the_measurement(fp32, bf16, expect):
    rates = {"fp32": fp32, "bf16": bf16}
    chosen, measured = P.choose("auto", "cpu", native_bf16=True, cuda_bf16=False,
                                measure=lambda p: rates[p.name])
    assert chosen.name == expect and chosen.channels_last
    assert measured == {**rates, "bf16_per_fp32": round(bf16 / fp32, 2)}


def test_auto_measures_in_turns_so_a_load_that_starts_meanwhile_slows_both():
    """A job that starts while fp32 is measured (and runs on) slowed bf16 alone when measured second."""
    calls = []

    def loaded_after_first(p):  # 100 / 300 images/s alone, a tenth of that once the load has started
        calls.append(p.name)
        rate = {"fp32": 100.0, "bf16": 300.0}[p.name]
        return rate if len(calls) == 1 else rate / 10
    chosen, measured = P.choose("auto", "cpu", native_bf16=True, cuda_bf16=False, measure=loaded_after_first)
    assert calls[:4] == ["fp32", "bf16", "fp32", "bf16"] and len(calls) == 2 * P._ROUNDS
    assert chosen.name == "bf16" and measured == {"fp32": 100.0, "bf16": 30.0, "bf16_per_fp32": 3.0}


def test_explicit_choices_and_gpu_defaults():
    assert P.choose("bf16", "cpu", False, False, _never)[0] == P.Precision("bf16", True)
    assert P.choose("fp32", "cpu", True, False, _never)[0] == P.Precision("fp32", True)
    assert P.choose("auto", "cuda", False, True, _never)[0] == P.Precision("bf16", False)
    assert P.choose("auto", "cuda", False, False, _never)[0] == P.Precision("fp16", False)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        P.choose("fp16", "cpu", True, False, _never)
    with pytest.raises(UserError, match="choose one of"):
        P.choose("int8", "cpu", True, False, _never)


def test_cpu_info_names_the_machine():
    info = P.cpu_info()
    assert info["cpu"] and info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["native_bf16"], list)


def test_resolve_sets_the_model_and_records_the_choice():
    model = SiameseNet(ModelConfig(input_size=(64, 64))).eval()
    rec = P.resolve(model, "bf16")
    assert model.precision.name == "bf16" and rec["choice"]["name"] == "bf16" and rec["requested"] == "bf16"
    assert rec["cpu"] == P.cpu_info()["cpu"]
    # a record from the same machine is reused as it is, without measuring
    recorded = {**rec, "requested": "auto", "choice": {"name": "fp32", "channels_last": False}}
    P.resolve(model, "auto", recorded)
    assert model.precision == P.Precision("fp32", False)
    # ... but not one from another CPU
    P.resolve(model, "auto", {**recorded, "cpu": "some other CPU"})
    assert model.precision.channels_last  # chosen afresh for this machine
    if not P.cpu_info()["native_bf16"]:
        assert model.precision == P.Precision("fp32", True)


def test_measuring_leaves_the_network_untouched():
    """The first-use measurement feeds random input through the network: in train mode that would
    rewrite its batch-norm statistics (and so every embedding) on CPUs with native bf16."""
    model = SiameseNet(ModelConfig(input_size=(64, 64))).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure = P._measurer(model, torch.device("cpu"), (64, 64), batch=2, repeats=1)
    for p in (P.Precision("fp32", True), P.Precision("bf16", True), P.Precision("fp32", False)):
        assert measure(p) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a measurement changed the weights"
    assert model.training  # its mode as the caller left it


def test_precision_is_part_of_the_cache_fingerprint_and_bf16_stays_close_to_fp32():
    model = SiameseNet(ModelConfig(input_size=(96, 128))).eval()
    x = np.stack([preprocess(render_canonical(make_individual(f"i{k}", k), size=(96, 128)), model.config)
                  for k in range(2)])
    model.set_precision(P.Precision("fp32", True))
    fp32, fp32_key = features_batch(model, x, 2), model_fingerprint(model)
    model.set_precision(P.Precision("fp32", False))
    contiguous = features_batch(model, x, 2)
    model.set_precision(P.Precision("bf16", True))
    bf16, bf16_key = features_batch(model, x, 2), model_fingerprint(model)
    assert fp32_key != bf16_key
    cos = torch.nn.functional.cosine_similarity
    fp32, contiguous, bf16 = (torch.from_numpy(a) for a in (fp32, contiguous, bf16))
    # the memory format changes only the order of the sums (measured: ~1e-5 relative)
    assert (cos(fp32, contiguous) > 0.99999).all()
    # bf16 keeps 8 bits of mantissa: close, but not the same function
    assert (cos(fp32, bf16) > 0.99).all() and not torch.equal(fp32, bf16)


def test_benchmark_headline_names_the_cpu_generation():
    # lscpu's model name can be generic ("AMD EPYC" with and without native bf16): the headline of
    # every benchmark adds family / model / stepping of the first CPU
    from bench.machine import cpu_generation, headline
    two_cpus = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
                "stepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 6\nmodel\t\t: 167\nstepping\t: 0\n")
    assert cpu_generation(two_cpus) == "family 25 model 17 stepping 1"
    assert cpu_generation("processor : 0\nCPU implementer : 0x41\n") == ""  # ARM: not given
    info = {"cpu": "AMD EPYC", "cpu_generation": "family 25 model 1 stepping 1", "torch_cpu_capability": "AVX2",
            "native_bf16": [], "threads": 2, "torch": "2.13.0+cpu"}
    assert headline(info) == ("machine: AMD EPYC family 25 model 1 stepping 1 (AVX2, native bf16: no), 2 threads; "
                              "torch 2.13.0+cpu")
    assert headline({**info, "cpu_generation": ""}).startswith("machine: AMD EPYC (AVX2")
