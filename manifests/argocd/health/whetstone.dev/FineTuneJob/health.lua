-- Argo CD health of a whetstone.dev FineTuneJob, from the status the operator writes: phase and the
-- conditions Created, Running, Restarting, Suspended, Succeeded and Failed (always all six, True or False).
-- argocd-cm scripts run without Lua's standard libraries, so only the base language is used here.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to pick the job up"
  return hs
end
local generation = obj.metadata.generation or 0
if (status.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Whetstone operator to observe generation " .. generation
  return hs
end

local function condition(kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function holds(kind)
  local c = condition(kind)
  return c ~= nil and c.status == "True", c
end

local function explain(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local failed, fc = holds("Failed")
if failed then
  hs.status = "Degraded"
  hs.message = explain(fc, "Failed")
  return hs
end
local succeeded, sc = holds("Succeeded")
if succeeded then
  hs.status = "Healthy"
  hs.message = explain(sc, "Succeeded")
  if status.outputUri ~= nil then
    hs.message = hs.message .. "; output " .. status.outputUri
  end
  return hs
end
local suspended, uc = holds("Suspended")
if suspended then
  hs.status = "Suspended"
  hs.message = explain(uc, "Suspended (spec.suspend, or waiting for queue admission)")
  return hs
end
local restarting, rc = holds("Restarting")
if restarting then
  hs.status = "Progressing"
  hs.message = "Restarting: " .. explain(rc, "a pod failed")
  return hs
end
local running = holds("Running")
if running then
  hs.status = "Progressing"
  local progress = status.progress or {}
  if progress.step ~= nil and progress.totalSteps ~= nil then
    hs.message = "Running: step " .. progress.step .. " of " .. progress.totalSteps
  else
    hs.message = "Running"
  end
  return hs
end
hs.status = "Progressing"
hs.message = status.phase
if status.message ~= nil and status.message ~= "" then
  hs.message = status.phase .. ": " .. status.message
end
return hs
