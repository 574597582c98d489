-- Argo CD health of a whetstone.dev TrainingSession, a long-lived service: Healthy while Ready, Suspended
-- when suspended, Degraded when it failed, Progressing while it starts.
-- argocd-cm scripts run without Lua's standard libraries, so only the base language is used here.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to start the session"
  return hs
end
local generation = obj.metadata.generation or 0
if (status.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to observe generation " .. generation
  return hs
end
local conditions = {}
for _, c in ipairs(status.conditions or {}) do
  conditions[c.type] = c
end
local function text(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end
local failed = conditions["Failed"]
if status.phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  hs.message = text(failed or conditions["Ready"], "Failed")
  return hs
end
local suspended = conditions["Suspended"]
if status.phase == "Suspended" or (suspended ~= nil and suspended.status == "True") then
  hs.status = "Suspended"
  hs.message = text(suspended, "Suspended")
  return hs
end
local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready, "Ready")
  if status.endpoint ~= nil then
    hs.message = "Ready at " .. status.endpoint
  end
  return hs
end
hs.status = "Progressing"
hs.message = text(ready, status.phase)
return hs
