// The SIMT emulator's runtime: fibers, the block scheduler, barriers, warp
// collectives and the launch checks. See simt.h.
#include "simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define TBD_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TBD_EMU_ASAN 1
#endif
#endif

#ifdef TBD_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__) && !defined(TBD_EMU_UCONTEXT)
#define TBD_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace tbd_emu {

thread_local uint3 tls_thread_idx;
thread_local uint3 tls_block_idx;
thread_local dim3 tls_block_dim;
thread_local dim3 tls_grid_dim;

namespace {

// ---- context switch -----------------------------------------------------------
#ifdef TBD_EMU_ASM_SWITCH
// Saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *from and continues on `to`.
extern "C" void tbd_emu_switch_context(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl tbd_emu_switch_context
  .hidden tbd_emu_switch_context
  .type tbd_emu_switch_context,@function
tbd_emu_switch_context:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size tbd_emu_switch_context, .-tbd_emu_switch_context
)");

struct Context {
  void* sp = nullptr;
};
#else
struct Context {
  ucontext_t uc;
};
#endif

// ---- fiber stacks ---------------------------------------------------------------
#ifdef TBD_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

struct Stack {
  char* base = nullptr;  // lowest usable address (a guard page lies below)
  size_t size = 0;
};

// Stacks are mapped once per OS thread and reused by every block.
struct StackPool {
  std::vector<Stack> stacks;
  ~StackPool() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (auto& s : stacks) munmap(s.base - page, s.size + page);
  }
  Stack get(size_t i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (stacks.size() <= i) {
      void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) throw std::runtime_error("tbd_emu: cannot map a fiber stack");
      mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
      stacks.push_back({static_cast<char*>(m) + page, kStackBytes});
    }
    return stacks[i];
  }
};

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Fiber {
  Context ctx;
  Stack stack;
  uint3 tid;
  int linear = 0;
  State state = State::kReady;
  uint64_t warp_gen = 0;  // generation of the collective it waits at
  uint64_t result = 0;    // value a collective returns to it
  void* fake_stack = nullptr;  // ASan's fake stack of the fiber while it is switched out
};

struct WarpState {
  bool pending = false;
  Collective kind = Collective::kShfl;
  unsigned mask = 0;
  unsigned arrived = 0;
  unsigned exited = 0;  // lanes that have finished the kernel
  int width = 32;
  const char* file = nullptr;
  int line = 0;
  uint64_t value[32];
  int arg[32];
};

struct BlockRun;

struct ThreadState {
  Schedule schedule = Schedule::kForward;
  std::mt19937_64 rng{0};
  StackPool pool;
  BlockRun* block = nullptr;
  Fiber* current = nullptr;
  uint64_t epoch = 0;
  std::vector<unsigned char> dyn;
  size_t dyn_bytes = 0;
  size_t static_bytes = 0;  // static shared arrays the running block touched
  std::string last_error;   // of the last rejected launch (cudaGetLastError)
};
thread_local ThreadState tls;

std::atomic<uint64_t> g_launches{0};
std::atomic<unsigned> g_grid_yz_limit{kMaxGridDim[1]};
std::mutex g_attr_mu;
std::unordered_map<const void*, size_t>& smem_optin() {
  static std::unordered_map<const void*, size_t> m;
  return m;
}
std::unordered_map<const void*, size_t>& static_smem() {  // under g_attr_mu
  static std::unordered_map<const void*, size_t> m;
  return m;
}
std::mutex g_ops_mu;
std::map<std::string, uint64_t>& op_table() {  // under g_ops_mu
  static std::map<std::string, uint64_t> m;
  return m;
}

// "(decode_kernel<T, A>)" -> "decode_kernel": the name as launch_kernel spells
// it, without the parentheses a template needs in a macro argument or its
// (symbolic) template arguments.
std::string kernel_name(const char* spelled) {
  std::string s(spelled);
  while (!s.empty() && (s.front() == '(' || s.front() == ' ')) s.erase(0, 1);
  const size_t cut = s.find_first_of("<)");
  if (cut != std::string::npos) s.resize(cut);
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// The opt-in of a kernel (0: none).
size_t optin_of(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  auto it = smem_optin().find(kernel);
  return it == smem_optin().end() ? 0 : it->second;
}

// Why `static_bytes` of static and `dyn` of dynamic shared memory cannot run
// for a kernel with opt-in `optin` (0: none); "" if they can.
std::string smem_violation(size_t static_bytes, size_t dyn, size_t optin) {
  std::ostringstream s;
  if (static_bytes > kMaxStaticSmem) {
    s << static_bytes << " bytes of static shared memory: more than the 48 KiB a kernel may declare";
  } else if (optin == 0 && static_bytes + dyn > kDefaultMaxDynamicSmem) {
    s << static_bytes << " bytes of static + " << dyn << " bytes of dynamic shared memory: more than "
      << "the 48 KiB a block may use without cudaFuncAttributeMaxDynamicSharedMemorySize";
  } else if (optin != 0 && dyn > optin) {
    s << dyn << " bytes of dynamic shared memory: more than the kernel opted in to (" << optin << ")";
  } else if (optin != 0 && static_bytes + optin > kMaxDynamicSmemOptIn) {
    s << static_bytes << " bytes of static shared memory + the opt-in of " << optin
      << " bytes: more than the 227 KiB of sm_90";
  }
  return s.str();
}

std::string fmt3(const uint3& v) {
  std::ostringstream s;
  s << "(" << v.x << ", " << v.y << ", " << v.z << ")";
  return s.str();
}

struct BlockRun {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Context sched;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const LaunchSite* site = nullptr;
  const void* kernel = nullptr;
  size_t optin = 0;  // the kernel's dynamic shared memory opt-in (0: none)
  int live = 0;       // fibers not done
  int exited = 0;     // fibers done
  int at_barrier = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::vector<int> ready;  // fiber indices, in resume order
  std::vector<int> scratch;
  std::string error;
  // The scheduler's stack, as ASan reports it when the first fiber starts (ASan builds only).
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;

  int lanes_in_warp(int w) const {
    const int n = static_cast<int>(fibers.size());
    return std::min(kWarpSize, n - w * kWarpSize);
  }

  // Appends the given fibers to the ready list in schedule order.
  // `ids` come in increasing order.
  void release(std::vector<int>& ids) {
    switch (tls.schedule) {
      case Schedule::kForward: break;
      case Schedule::kReverse: std::reverse(ids.begin(), ids.end()); break;
      case Schedule::kShuffle: std::shuffle(ids.begin(), ids.end(), tls.rng); break;
    }
    for (int i : ids) {
      fibers[i].state = State::kReady;
      ready.push_back(i);
    }
  }
};

[[noreturn]] void fiber_main();

// Saves the running context in `from` and resumes `to`, whose stack is [stack_bottom, + stack_size).
// Under ASan the switch is announced with where the fake stack of the context left is kept
// (nullptr: it never resumes) and, once `from` resumes, completed with that fake stack.
void switch_context(Context& from, Context& to, void** fake_stack, const void* stack_bottom,
                    size_t stack_size) {
#ifdef TBD_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, stack_bottom, stack_size);
#else
  (void)fake_stack;
  (void)stack_bottom;
  (void)stack_size;
#endif
#ifdef TBD_EMU_ASM_SWITCH
  tbd_emu_switch_context(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#ifdef TBD_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack ? *fake_stack : nullptr, nullptr, nullptr);
#endif
}

void switch_to_fiber(BlockRun& b, Fiber& f) {
  tls.current = &f;
  tls_thread_idx = f.tid;
  void* fake = nullptr;
  switch_context(b.sched, f.ctx, &fake, f.stack.base, f.stack.size);
  tls.current = nullptr;
}

// From a fiber back to the block scheduler; `done` fibers never come back.
void yield_to_scheduler(bool done) {
  BlockRun& b = *tls.block;
  Fiber& f = *tls.current;
  switch_context(f.ctx, b.sched, done ? nullptr : &f.fake_stack, b.sched_stack_bottom, b.sched_stack_size);
  tls_thread_idx = f.tid;
}

void init_fiber(Fiber& f) {
#ifdef TBD_EMU_ASAN
  __asan_unpoison_memory_region(f.stack.base, f.stack.size);
  f.fake_stack = nullptr;
#endif
#ifdef TBD_EMU_ASM_SWITCH
  // Frame consumed by the first switch: MXCSR/x87 word, six registers, and
  // the return address fiber_main, placed so that fiber_main starts with the
  // stack alignment of a called function.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.base + f.stack.size) & ~uintptr_t(15);
  uint64_t* ret = reinterpret_cast<uint64_t*>(top - 16);
  *ret = reinterpret_cast<uint64_t>(&fiber_main);
  uint64_t* regs = ret - 6;
  for (int i = 0; i < 6; ++i) regs[i] = 0;
  uint32_t* ctl = reinterpret_cast<uint32_t*>(regs - 1);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  ctl[0] = mxcsr;
  ctl[1] = fpucw;
  f.ctx.sp = regs - 1;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack.base;
  f.ctx.uc.uc_stack.ss_size = f.stack.size;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

void fiber_main() {
#ifdef TBD_EMU_ASAN
  {
    BlockRun& b = *tls.block;
    __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
  }
#endif
  {
    BlockRun& b = *tls.block;
    tls_thread_idx = tls.current->tid;
    b.body(b.ctx);
  }
  BlockRun& b = *tls.block;
  Fiber& f = *tls.current;
  f.state = State::kDone;
  --b.live;
  ++b.exited;
  if (b.at_barrier > 0 && b.error.empty()) {
    std::ostringstream s;
    s << b.bar_file << ":" << b.bar_line << ": __syncthreads is not reached by thread "
      << fmt3(f.tid) << ", which exited while " << b.at_barrier << " threads wait there";
    b.error = s.str();
  }
  const int w = f.linear / kWarpSize;
  WarpState& ws = b.warps[w];
  ws.exited |= 1u << (f.linear % kWarpSize);
  if (ws.pending && (ws.mask >> (f.linear % kWarpSize) & 1u) && b.error.empty()) {
    std::ostringstream s;
    s << ws.file << ":" << ws.line << ": warp collective with mask 0x" << std::hex << ws.mask
      << std::dec << " names lane " << f.linear % kWarpSize << " (thread " << fmt3(f.tid)
      << "), which exited without reaching it";
    b.error = s.str();
  }
  yield_to_scheduler(true);
  std::abort();  // unreachable: a done fiber is never resumed
}

std::string where() {
  BlockRun& b = *tls.block;
  std::ostringstream s;
  s << " [kernel " << b.site->kernel << " launched at " << b.site->file << ":" << b.site->line
    << ", block " << fmt3(tls_block_idx) << ", thread " << fmt3(tls_thread_idx) << "]";
  return s.str();
}

}  // namespace

// ---- public API -------------------------------------------------------------------
void set_grid_yz_limit(unsigned limit) {
  g_grid_yz_limit = limit == 0 ? kMaxGridDim[1] : std::min(limit, kMaxGridDim[1]);
}
unsigned grid_yz_limit() { return g_grid_yz_limit.load(); }

void set_schedule(Schedule s, uint64_t seed) {
  tls.schedule = s;
  tls.rng.seed(seed);
}
Schedule schedule() { return tls.schedule; }
uint64_t launch_count() { return g_launches.load(); }

std::vector<std::pair<std::string, uint64_t>> op_counts() {
  std::lock_guard<std::mutex> lock(g_ops_mu);
  return {op_table().begin(), op_table().end()};
}
void reset_op_counts() {
  std::lock_guard<std::mutex> lock(g_ops_mu);
  op_table().clear();
}
void count_op(const char* name) {
  std::lock_guard<std::mutex> lock(g_ops_mu);
  ++op_table()[name];
}

std::string get_last_error() {
  std::string e;
  e.swap(tls.last_error);
  return e;
}
std::string peek_last_error() { return tls.last_error; }

size_t static_smem_bytes(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  auto it = static_smem().find(kernel);
  return it == static_smem().end() ? 0 : it->second;
}

void note_static_smem(size_t bytes) {
  if (tls.block == nullptr || tls.current == nullptr) return;
  BlockRun& b = *tls.block;
  tls.static_bytes += bytes;
  const std::string why = smem_violation(tls.static_bytes, tls.dyn_bytes, b.optin);
  if (!why.empty()) {
    std::ostringstream s;
    s << "launch of " << b.site->kernel << " needs " << why;
    tls.last_error = s.str();
    fail(b.site->file, b.site->line, s.str());
  }
}
uint64_t block_epoch() { return tls.epoch; }
void* dynamic_smem() { return tls.dyn_bytes ? tls.dyn.data() : nullptr; }
size_t dynamic_smem_bytes() { return tls.dyn_bytes; }

void set_max_dynamic_smem(const void* kernel, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_attr_mu);
  smem_optin()[kernel] = bytes;
}

void fail(const char* file, int line, const std::string& msg) {
  if (tls.block == nullptr || tls.current == nullptr) {
    std::ostringstream s;
    s << file << ":" << line << ": " << msg;
    throw KernelError(s.str());
  }
  BlockRun& b = *tls.block;
  if (b.error.empty()) {
    std::ostringstream s;
    s << file << ":" << line << ": " << msg << where();
    b.error = s.str();
  }
  // Park this fiber for good: the scheduler ends the launch.
  tls.current->state = State::kBarrier;
  yield_to_scheduler(false);
  std::abort();  // unreachable
}

void syncthreads(const char* file, int line) {
  BlockRun& b = *tls.block;
  Fiber& f = *tls.current;
  if (b.exited > 0) {
    std::ostringstream s;
    s << "__syncthreads is not reached by every thread of the block: " << b.exited
      << " thread(s) exited before it";
    fail(file, line, s.str());
  }
  if (b.at_barrier > 0 && (b.bar_line != line || std::strcmp(b.bar_file, file) != 0)) {
    std::ostringstream s;
    s << "divergent __syncthreads: this thread waits here while " << b.at_barrier
      << " thread(s) wait at " << b.bar_file << ":" << b.bar_line;
    fail(file, line, s.str());
  }
  b.bar_file = file;
  b.bar_line = line;
  f.state = State::kBarrier;
  if (++b.at_barrier == b.live) {
    std::vector<int>& ids = b.scratch;
    ids.clear();
    for (auto& g : b.fibers)
      if (g.state == State::kBarrier) ids.push_back(g.linear);
    b.at_barrier = 0;
    b.release(ids);
  }
  yield_to_scheduler(false);
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line) {
  BlockRun& b = *tls.block;
  Fiber& f = *tls.current;
  const int w = f.linear / kWarpSize;
  const int lane = f.linear % kWarpSize;
  const int nl = b.lanes_in_warp(w);
  const unsigned present = nl == 32 ? 0xffffffffu : ((1u << nl) - 1u);
  if (!(mask >> lane & 1u)) {
    std::ostringstream s;
    s << "warp collective called by lane " << lane << " with a mask 0x" << std::hex << mask
      << " that does not name it";
    fail(file, line, s.str());
  }
  if (mask & ~present) {
    std::ostringstream s;
    s << "warp collective mask 0x" << std::hex << mask << " names lanes absent from warp "
      << std::dec << w << " (it has " << nl << " threads)";
    fail(file, line, s.str());
  }
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    std::ostringstream s;
    s << "shuffle width must be a power of two in [1, 32], got " << width;
    fail(file, line, s.str());
  }
  WarpState& ws = b.warps[w];
  if (mask & ws.exited) {
    std::ostringstream s;
    s << "warp collective mask 0x" << std::hex << mask << " names lane(s) 0x"
      << (mask & ws.exited) << ", which have exited";
    fail(file, line, s.str());
  }
  if (ws.pending) {
    if (ws.mask != mask || ws.kind != kind || ws.width != width || ws.line != line ||
        std::strcmp(ws.file, file) != 0) {
      std::ostringstream s;
      s << "lanes of warp " << w << " disagree: lane " << lane << " calls a collective with mask 0x"
        << std::hex << mask << " while others wait at " << ws.file << ":" << std::dec << ws.line
        << " with mask 0x" << std::hex << ws.mask;
      fail(file, line, s.str());
    }
  } else {
    ws.pending = true;
    ws.kind = kind;
    ws.mask = mask;
    ws.width = width;
    ws.file = file;
    ws.line = line;
    ws.arrived = 0;
  }
  ws.value[lane] = value;
  ws.arg[lane] = arg;
  ws.arrived |= 1u << lane;
  f.state = State::kWarp;
  if (ws.arrived == mask) {
    // Everybody is here: compute every lane's result now.
    std::vector<int>& ids = b.scratch;
    ids.clear();
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && ws.value[l]) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const int base = l & ~(ws.width - 1);
      int src = l;
      switch (kind) {
        case Collective::kShfl: src = base + (ws.arg[l] & (ws.width - 1)); break;
        case Collective::kShflUp: src = (l - ws.arg[l] >= base) ? l - ws.arg[l] : l; break;
        case Collective::kShflDown:
          src = (l + ws.arg[l] < base + ws.width) ? l + ws.arg[l] : l;
          break;
        case Collective::kShflXor: {
          const int x = l ^ ws.arg[l];
          src = (x >= base && x < base + ws.width) ? x : l;
          break;
        }
        default: break;
      }
      Fiber& g = b.fibers[w * kWarpSize + l];
      if (kind == Collective::kBallot) {
        g.result = ballot;
      } else if (kind == Collective::kSyncWarp) {
        g.result = 0;
      } else {
        if (!(mask >> src & 1u)) {
          std::ostringstream e;
          e << "lane " << l << " reads lane " << src << ", which is not in the mask 0x"
            << std::hex << mask;
          fail(file, line, e.str());
        }
        g.result = ws.value[src];
      }
      ids.push_back(g.linear);
    }
    ws.pending = false;
    b.release(ids);
  }
  yield_to_scheduler(false);
  return f.result;
}

void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
            void* ctx, const LaunchSite& site) {
  auto reject = [&](const std::string& msg) {
    std::ostringstream s;
    s << site.file << ":" << site.line << ": launch of " << site.kernel << " with grid "
      << fmt3(uint3{grid.x, grid.y, grid.z}) << ", block " << fmt3(uint3{block.x, block.y, block.z})
      << " and " << smem << " bytes of dynamic shared memory: " << msg;
    tls.last_error = s.str();  // as the runtime: until cudaGetLastError reads it
    throw KernelError(s.str());
  };
  const unsigned bd[3] = {block.x, block.y, block.z};
  const unsigned gd[3] = {grid.x, grid.y, grid.z};
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || uint64_t(grid.x) * grid.y * grid.z == 0)
    reject("every grid and block dimension must be >= 1");
  if (threads > kMaxThreadsPerBlock) reject("more than 1024 threads per block");
  const unsigned gl[3] = {kMaxGridDim[0], grid_yz_limit(), grid_yz_limit()};
  for (int i = 0; i < 3; ++i) {
    if (bd[i] > kMaxBlockDim[i]) reject("block dimension over the limit (1024, 1024, 64)");
    if (gd[i] > gl[i]) {
      reject("grid dimension over the limit (2^31 - 1, " + std::to_string(gl[1]) + ", " +
             std::to_string(gl[2]) + ")");
    }
  }
  // Static shared memory is known once the kernel has run (see note_static_smem).
  const size_t optin = optin_of(kernel);
  {
    const std::string why = smem_violation(static_smem_bytes(kernel), smem, optin);
    if (!why.empty()) reject("needs " + why);
  }
  if (tls.block != nullptr) reject("a kernel cannot launch another kernel here");
  g_launches.fetch_add(1);
  count_op(kernel_name(site.kernel).c_str());

  BlockRun b;
  b.body = body;
  b.ctx = ctx;
  b.site = &site;
  b.kernel = kernel;
  b.optin = optin;
  const int nthreads = static_cast<int>(threads);
  b.fibers.resize(nthreads);
  b.warps.resize((nthreads + kWarpSize - 1) / kWarpSize);
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f.stack = tls.pool.get(i);
  }
  // A buffer of exactly `smem` bytes, so that AddressSanitizer flags any access past it.
  std::vector<unsigned char>(smem, 0xFF).swap(tls.dyn);
  tls.dyn_bytes = smem;
  tls_block_dim = block;
  tls_grid_dim = grid;
  tls.block = &b;
  struct Reset {
    ~Reset() {
      tls.block = nullptr;
      tls.current = nullptr;
      tls.dyn_bytes = 0;
    }
  } reset;
  size_t static_max = 0;
  auto remember_static = [&] {
    std::lock_guard<std::mutex> lock(g_attr_mu);
    size_t& known = static_smem()[kernel];
    known = std::max(known, static_max);
  };

  std::vector<int> all(nthreads);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        tls_block_idx = uint3{bx, by, bz};
        ++tls.epoch;
        tls.static_bytes = 0;
        if (smem) std::memset(tls.dyn.data(), 0xFF, smem);
        b.live = nthreads;
        b.exited = 0;
        b.at_barrier = 0;
        b.ready.clear();
        for (auto& ws : b.warps) {
          ws.pending = false;
          ws.exited = 0;
        }
        for (auto& f : b.fibers) init_fiber(f);
        std::iota(all.begin(), all.end(), 0);
        b.release(all);
        size_t next = 0;
        while (b.live > 0 && b.error.empty()) {
          if (next == b.ready.size()) {
            // Nobody can run: report who waits where.
            std::ostringstream s;
            int nb = 0, nw = 0;
            const WarpState* pw = nullptr;
            for (auto& f : b.fibers) {
              if (f.state == State::kBarrier) ++nb;
              if (f.state == State::kWarp) {
                ++nw;
                pw = &b.warps[f.linear / kWarpSize];
              }
            }
            s << "deadlock: " << nb << " thread(s) wait at __syncthreads";
            if (nb) s << " (" << b.bar_file << ":" << b.bar_line << ")";
            s << " and " << nw << " at a warp collective";
            if (pw) s << " (" << pw->file << ":" << pw->line << ")";
            s << "; a barrier or warp collective is not reached by every thread it names";
            b.error = s.str();
            break;
          }
          const int id = b.ready[next++];
          Fiber& f = b.fibers[id];
          if (f.state != State::kReady) continue;
          switch_to_fiber(b, f);
        }
        static_max = std::max(static_max, tls.static_bytes);
        if (!b.error.empty()) {
          remember_static();
          std::ostringstream s;
          s << b.error;
          if (b.error.find(" [kernel ") == std::string::npos) {
            s << " [kernel " << site.kernel << " launched at " << site.file << ":" << site.line
              << ", block " << fmt3(tls_block_idx) << "]";
          }
          throw KernelError(s.str());
        }
      }
    }
  }
  remember_static();
}

}  // namespace tbd_emu
