-- Argo CD health of a whetstone.dev RewardGrader: Healthy when its test cases pass (condition Ready True),
-- Degraded when they fail or the spec is unusable (phase Failed), Progressing while they run.
-- argocd-cm scripts run without Lua's standard libraries, so only the base language is used here.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to run the grader's test cases"
  return hs
end
local generation = obj.metadata.generation or 0
if (status.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to test generation " .. generation
  return hs
end
local ready = nil
for _, c in ipairs(status.conditions or {}) do
  if c.type == "Ready" then
    ready = c
  end
end
local message = status.phase
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  message = ready.message
elseif ready ~= nil and ready.reason ~= nil and ready.reason ~= "" then
  message = ready.reason
end
hs.message = message
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
elseif status.phase == "Failed" then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
return hs
