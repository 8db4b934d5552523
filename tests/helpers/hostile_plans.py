"""Plans that break the node's sandbox rules, one rule each (own module: only these imports travel)."""

import os
import resource
import shutil
import socket
import subprocess

import torch
from torch import nn

from meshfl.plans import TorchTrainingPlan


class GreedyPlan(TorchTrainingPlan):
    """Allocates ``args["megabytes"]`` MiB at once (ten times the node's cap in the test)."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        hoard = torch.ones(int(args["megabytes"]) << 18)  # float32: 4 bytes each
        return {"steps": float(hoard[0])}


class SocketPlan(TorchTrainingPlan):
    """Opens a socket to ship the data out, and carries on if that fails."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        try:
            with socket.create_connection(("127.0.0.1", int(args["port"])), timeout=2) as link:
                link.sendall(train[0].numpy().tobytes())
        except OSError:
            pass  # a careless plan swallows the refusal: the node still fails the task
        return {"steps": 0}


class SnoopPlan(TorchTrainingPlan):
    """Reads a file outside its dataset and reports its size as a metric."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        with open("/etc/passwd") as f:
            return {"leaked_bytes": float(len(f.read()))}


class ShellPlan(TorchTrainingPlan):
    """Forks a shell."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        subprocess.run(["sh", "-c", "echo owned"], check=False)
        return {"steps": 0}


class SpinPlan(TorchTrainingPlan):
    """Burns CPU until the node stops it."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        x = 0
        while True:
            x += 1


class WreckPlan(TorchTrainingPlan):
    """Deletes a file of the node's (``args["victim"]``), and carries on if that fails."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        try:
            os.remove(args["victim"])
        except OSError:
            pass
        return {"steps": 0}


class UncapPlan(TorchTrainingPlan):
    """Lifts its own CPU-time cap (the soft limit up to the hard one), and carries on if that fails."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        try:
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        except (OSError, ValueError):
            pass
        return {"steps": 0}


class ScratchPlan(TorchTrainingPlan):
    """Writes into its working folder (its scratch folder), tidies up there, and reports where that is."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        with open("notes.txt", "w") as f:
            f.write("intermediate results")
        os.makedirs("tmp/epochs")
        torch.save({"w": model.weight.detach()}, "tmp/epochs/1.pt")
        os.rename("tmp/epochs/1.pt", "checkpoint.pt")
        shutil.rmtree("tmp")  # removes relative to the folder it opened (dir_fd)
        here = os.getcwd()
        return {"in_scratch": float(os.path.basename(os.path.dirname(here)) == "scratch"),
                "wrote": float(os.path.exists(os.path.join(here, "checkpoint.pt")))}
