"""Sim drivers that each break one rule of the driver contract, to show
that the conformance suite (tests/driver_contract.py) catches each one by
the rule's name (tests/test_contract_mutations.py)."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from vmpool.models import InputFile, TangoMachine
from vmpool.vmms import Feedback
from vmpool_drivers.sim import SimVMMS


class GetVMsForgets(SimVMMS):
    """getVMs leaves out the VM made last."""

    async def getVMs(self) -> list[TangoMachine]:
        return (await super().getVMs())[:-1]


class GetVMsSeesEveryOwner(SimVMMS):
    """getVMs lists other owners' VMs too."""

    async def getVMs(self) -> list[TangoMachine]:
        return list(self.world.live.values())


class RunJobIgnoresCancel(SimVMMS):
    """runJob shields the job from cancellation (it runs on to its end)."""

    async def runJob(self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int,
                     disableNetwork: bool) -> int:
        with anyio.CancelScope(shield=True):
            return await super().runJob(vm, runTimeout, maxOutputFileSize, disableNetwork)


class NoOutputCap(SimVMMS):
    """runJob ignores maxOutputFileSize."""

    async def runJob(self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int,
                     disableNetwork: bool) -> int:
        return await super().runJob(vm, runTimeout, 0, disableNetwork)


class IgnoresTimeout(SimVMMS):
    """runJob lets the job run past runTimeout."""

    async def runJob(self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int,
                     disableNetwork: bool) -> int:
        return await super().runJob(vm, 0, maxOutputFileSize, disableNetwork)


class OrphansIncludeTheLiving(SimVMMS):
    """getOrphans returns every VM, a live manager's too."""

    async def getOrphans(self) -> list[TangoMachine]:
        return list(self.world.live.values())


class CopyOutKeepsFeedback(SimVMMS):
    """copyOut leaves the feedback behind (a later copyOut copies it again)."""

    async def copyOut(self, vm: TangoMachine, destFile: str) -> None:
        kept = vm.feedback
        await super().copyOut(vm, destFile)
        vm.feedback = kept


class DestroyLeavesTheVM(SimVMMS):
    """destroyVM returns without removing the VM."""

    async def destroyVM(self, vm: TangoMachine) -> None:
        self.discard_feedback(vm)


class CopyInDropsFiles(SimVMMS):
    """copyIn forgets the job's description file (the job runs the default)."""

    async def copyIn(self, vm: TangoMachine, inputFiles: Sequence[InputFile]) -> None:
        await super().copyIn(vm, [f for f in inputFiles if f.destFile != "sim-job.json"])


class FeedbackOfAnEarlierJob(SimVMMS):
    """runJob keeps the first job's feedback for every later job on the VM."""

    async def runJob(self, vm: TangoMachine, runTimeout: float, maxOutputFileSize: int,
                     disableNetwork: bool) -> int:
        first = vm.driver_data.get("first_feedback")
        status = await super().runJob(vm, runTimeout, maxOutputFileSize, disableNetwork)
        if first is None:
            vm.driver_data["first_feedback"] = vm.feedback
        else:
            vm.feedback = Feedback(data=first.data)
        return status


#: mutant -> the rule of the suite that must catch it
MUTANTS: dict[str, tuple[type[SimVMMS], str]] = {
    "getvms-forgets": (GetVMsForgets, "test_lifecycle"),
    "getvms-sees-every-owner": (GetVMsSeesEveryOwner, "test_getvms_sees_only_its_own"),
    "runjob-ignores-cancel": (RunJobIgnoresCancel, "test_runjob_cancelled_leaves_nothing"),
    "no-output-cap": (NoOutputCap, "test_output_cap"),
    "ignores-timeout": (IgnoresTimeout, "test_timeout"),
    "orphans-include-the-living": (OrphansIncludeTheLiving, "test_orphans_of_dead_owner"),
    "copyout-keeps-feedback": (CopyOutKeepsFeedback, "test_copyout_takes_the_feedback"),
    "destroy-leaves-the-vm": (DestroyLeavesTheVM, "test_lifecycle"),
    "copyin-drops-files": (CopyInDropsFiles, "test_exit_status_and_make_failure"),
    "feedback-of-an-earlier-job": (FeedbackOfAnEarlierJob,
                                   "test_second_job_on_a_vm_gets_its_own_feedback"),
}
