"""`--demo`: the simulator on a free loopback port, a few tenants, RCAs arriving, and a config for them."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, demo_config
from .simulator import Arrivals, Simulator, SimulatorServer, demo_simulator

ARRIVALS_PER_MINUTE = 6.0  # per busy tenant, so the numbers visibly move between refreshes
DEMO_INTERVAL = "15s"
DEMO_ANALYSES_INTERVAL = "5s"  # the live RCA counters tick along with the arrivals


@dataclass
class Demo:
    sim: Simulator
    server: SimulatorServer
    arrivals: Arrivals
    config: Config
    tenants: list[str]

    def stop(self) -> None:
        self.arrivals.stop()
        self.server.stop()


def start_demo(listen: str, seed: int = 1) -> Demo:
    sim = demo_simulator(seed)
    server = SimulatorServer(sim).start()
    tenants = sim.tenants()
    # The quiet tenant stays quiet: its empty windows show what "no data" looks like.
    arrivals = Arrivals(sim, ARRIVALS_PER_MINUTE, tenants=[t for t in tenants if t != "quiet"],
                        seed=seed).start()
    config = demo_config(server.url, {t: sim.token(t) for t in tenants}, listen,
                         defaults={"interval": DEMO_INTERVAL, "analyses_interval": DEMO_ANALYSES_INTERVAL})
    return Demo(sim, server, arrivals, config, tenants)
