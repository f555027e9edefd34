"""The stream worker (`moderation worker`): the Faust app and everything it runs with. Imports neither
`moderation.devkit` nor `moderation.offline`, and loads transformers only with the in-process detector."""
