"""GPU binding of the launchers (dsincubate/launch_env.py): the physical GPU ids handed to DeepSpeed's --include for the
full allocation and for the K concurrent module jobs, from CUDA_VISIBLE_DEVICES, SLURM's GPU binding or the device
count. Unit tier: `pytest tests/unit/test_gpu_binding.py -q`.

On 56f30d4 launchers/incubate.sh passed `--include localhost:0,...` counted from the visible devices, which DeepSpeed
reads as physical ids: with CUDA_VISIBLE_DEVICES=4,5,6,7 the jobs ran on GPUs 0-3 (another job's GPUs).
"""
import pytest

from dsincubate.errors import UserError
from dsincubate.launch_env import full_allocation, gpu_groups, usable_gpus


def test_without_any_binding_every_device_is_usable_and_k_jobs_split_it_evenly():
    ids = usable_gpus({}, 8)
    assert ids == list(range(8))
    assert gpu_groups(ids, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert full_allocation(ids) == ids


def test_a_cuda_visible_devices_subset_gives_its_physical_ids_not_0_to_n():
    ids = usable_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4)  # torch counts 4 devices under the mask
    assert ids == [4, 5, 6, 7]
    assert gpu_groups(ids, 2) == [[4, 5], [6, 7]]
    assert full_allocation(ids) == [4, 5, 6, 7]
    assert full_allocation(ids, num_gpus=2) == [4, 5]  # --num_gpus 2 means the first 2 usable, not GPUs 0,1


def test_two_jobs_sharing_a_node_with_disjoint_masks_get_disjoint_gpus():
    a = gpu_groups(usable_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4), 4)
    b = gpu_groups(usable_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 4), 4)
    assert not {i for g in a for i in g} & {i for g in b for i in g}


def test_an_unordered_mask_keeps_its_order():
    assert usable_gpus({"CUDA_VISIBLE_DEVICES": " 6, 2,7 "}, 3) == [6, 2, 7]


def test_an_empty_mask_means_no_gpu():
    assert usable_gpus({"CUDA_VISIBLE_DEVICES": ""}, 8) == []
    assert usable_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, 8) == []


def test_slurm_assigned_ids_are_used_when_cuda_visible_devices_is_unset():
    # the job sees every device of the node: SLURM's indices are the physical ids
    assert usable_gpus({"SLURM_JOB_GPUS": "2,3"}, 8) == [2, 3]
    # inside a step, the step's GPUs win over the job's
    assert usable_gpus({"SLURM_STEP_GPUS": "6,7", "SLURM_JOB_GPUS": "4,5,6,7"}, 8) == [6, 7]
    # SLURM may write ranges
    assert usable_gpus({"SLURM_JOB_GPUS": "4-7"}, 8) == [4, 5, 6, 7]
    # CUDA_VISIBLE_DEVICES (which SLURM sets relative to what the job sees) wins over both
    assert usable_gpus({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "6,7"}, 2) == [0, 1]


def test_slurm_ids_under_a_device_cgroup_are_renumbered_from_zero():
    # ConstrainDevices: the job's GPUs 6,7 are the only devices the process sees, as 0 and 1
    assert usable_gpus({"SLURM_JOB_GPUS": "6,7"}, 2) == [0, 1]
    with pytest.raises(UserError, match="sees 3 GPU"):
        usable_gpus({"SLURM_JOB_GPUS": "6,7"}, 3)


def test_g_not_divisible_by_k_gives_equal_groups_and_leaves_the_remainder_idle():
    ids = usable_gpus({"CUDA_VISIBLE_DEVICES": "1,2,3,4,5,6,7"}, 7)
    groups = gpu_groups(ids, 3)
    assert groups == [[1, 2], [3, 4], [5, 6]]  # GPU 7 idle: every module trains on the same number of ranks
    assert gpu_groups(list(range(8)), 3) == [[0, 1], [2, 3], [4, 5]]


def test_fewer_gpus_than_jobs_gives_no_groups_so_the_jobs_run_one_after_another():
    assert gpu_groups([4, 5, 6], 4) == []
    assert gpu_groups([], 2) == []


@pytest.mark.parametrize("env, match", [
    ({"CUDA_VISIBLE_DEVICES": "GPU-5d6e1c2a-0000"}, "UUID"),
    ({"CUDA_VISIBLE_DEVICES": "MIG-1/2/3"}, "UUID"),
    ({"CUDA_VISIBLE_DEVICES": "1,1"}, "twice"),
    ({"SLURM_JOB_GPUS": "a,b"}, "integer"),
])
def test_ids_that_cannot_be_mapped_to_include_are_refused(env, match):
    with pytest.raises(UserError, match=match):
        usable_gpus(env, 8)


def test_num_gpus_beyond_the_usable_gpus_is_refused():
    with pytest.raises(UserError, match="2 usable GPU"):
        full_allocation([4, 5], num_gpus=3)

