"""Gymnasium environments of helios. Importing this package registers them:

    import gymnasium
    import envs                                                   # registers the ids below
    env = gymnasium.make("helios/ModelDepthReplay-v0")            # or, without the import:
    env = gymnasium.make("envs:helios/ModelDepthReplay-v0")       # gymnasium imports `envs` first

| id                           | backend | what a step does                                         |
|------------------------------|---------|----------------------------------------------------------|
| helios/ModelDepth-v0         | live    | real early-exit inference (registered nondeterministic)  |
| helios/ModelDepthReplay-v0   | replay  | the same priced from recorded traces (fast, seeded)      |

Both are envs.model_depth.ModelDepthEnv (its docstring is the environment card); defaults come from
conf/env/{live,replay}.yaml. Gymnasium 1.x no longer loads plugins from package entry points, so registration
happens here, on import. Registering is cheap: nothing heavy is imported until an environment is made.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

ENV_IDS: dict[str, str] = {"live": "helios/ModelDepth-v0", "replay": "helios/ModelDepthReplay-v0"}

for _backend, _env_id in ENV_IDS.items():
    if _env_id not in registry:  # importing twice (or reloading) must not warn about re-registration
        register(
            id=_env_id,
            entry_point="envs.model_depth:ModelDepthEnv",
            kwargs={"backend": _backend},
            nondeterministic=_backend == "live",  # wall-clock timings: the same seed does not repeat rewards
        )

__all__ = ["ENV_IDS"]
