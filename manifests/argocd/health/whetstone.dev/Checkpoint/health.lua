-- Argo CD health of a whetstone.dev Checkpoint: Healthy once the operator recorded it as Available in
-- storage (or Pruned by the job's keepLast retention, which is expected); Degraded when Missing.
-- argocd-cm scripts run without Lua's standard libraries, so only the base language is used here.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to record the checkpoint"
  return hs
end
local generation = obj.metadata.generation or 0
if (status.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to observe generation " .. generation
  return hs
end
for _, c in ipairs(status.conditions or {}) do
  if (c.type == "Available" or c.type == "Ready") and c.status == "False" and c.reason ~= nil then
    hs.status = "Degraded"
    hs.message = c.message or c.reason
    return hs
  end
end
local where = ""
if obj.spec ~= nil and obj.spec.uri ~= nil then
  where = " at " .. obj.spec.uri
end
if status.phase == "Available" then
  hs.status = "Healthy"
  hs.message = "Available" .. where
elseif status.phase == "Pruned" then
  hs.status = "Healthy"
  hs.message = "Pruned from storage by the job's retention (keepLast)"
elseif status.phase == "Missing" then
  hs.status = "Degraded"
  hs.message = "Missing from storage" .. where
else
  hs.status = "Progressing"
  hs.message = status.phase
end
return hs
